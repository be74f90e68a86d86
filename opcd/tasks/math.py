"""Math reasoning: the final answer is read from an "Answer:" line or the last \\boxed{} and checked
against the ground truth with the `math-verify` library (symbolic equivalence: 1/2 == 0.5 ==
\\frac{1}{2}). Model text is only parsed, never evaluated.

Departure from the reference: it scores +1 / -1; our task metric is accuracy in [0, 1] (the same
ranking, reported the way papers report it). A thinking block (`<think>...</think>`) is removed
before the answer is looked for, so a guess inside the reasoning does not count.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from opcd.errors import DataError
from opcd.data.prompts import strip_thinking

ANSWER_LINE = re.compile(r"^\s*\**\s*answer\s*\**\s*[:：]\s*\**\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)

MATH_INSTRUCTION = ("Solve the problem below. Reason step by step, then give the final result on a "
                    "last line of the form \"Answer: <result>\".")


def math_user_message(problem: str) -> str:
    return f"{MATH_INSTRUCTION}\n\n{problem.strip()}"


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if absent or unclosed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].strip()
        i += 1
    return None


def extract_final_answer(response: str) -> str | None:
    """The final answer of a response: the last "Answer:" line, else the last \\boxed{}, else None."""
    text = strip_thinking(response)
    lines = ANSWER_LINE.findall(text)
    if lines:
        answer = lines[-1].strip().strip("$").strip()
        return last_boxed(answer) or answer or None
    return last_boxed(text)


def answers_match(predicted: str, ground_truth: str) -> bool:
    """Symbolic equivalence through math-verify; any parsing failure counts as a mismatch."""
    from math_verify import parse, verify

    # math-verify bounds its parsing time with SIGALRM, which only the main thread may use.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(_as_math(ground_truth), parsing_timeout=timeout)
        guess = parse(_as_math(predicted), parsing_timeout=timeout)
        return bool(gold) and bool(guess) and verify(gold, guess, timeout_seconds=timeout)
    except Exception:  # noqa: BLE001 - malformed model output must score 0, never crash a run
        return False


def _as_math(text: str) -> str:
    """math-verify looks for LaTeX delimiters or plain expressions; wrap bare answers in $...$."""
    text = text.strip()
    return text if text.startswith("$") or "\\boxed" in text else f"${text}$"


def math_score(response: str, ground_truth: str) -> float:
    predicted = extract_final_answer(response)
    return float(predicted is not None and answers_match(predicted, ground_truth))


@dataclass(frozen=True)
class MathTask:
    name: str = "math"

    def student_messages(self, row: dict) -> list[dict]:
        return [dict(message) for message in row["content"]]

    def answer_format_error(self, answer: str | None) -> str | None:
        return None if isinstance(answer, str) and answer.strip() else "the ground-truth answer as a non-empty string"

    def score(self, response: str, row: dict) -> float:
        if row.get("answer") is None:
            raise DataError(f"math row {row.get('id', '?')}: missing ground truth 'answer'")
        return math_score(response, row["answer"])


def reasoning_gym_rows(name: str, size: int, seed: int) -> list[dict]:
    """Offline problems from a reasoning-gym generator as dataset rows. `name` may carry generator
    options as a query: "basic_arithmetic?max_terms=2&max_digits=2" (integers and floats converted)."""
    import reasoning_gym

    name, _, query = name.partition("?")
    options = {}
    for pair in filter(None, query.split("&")):
        key, _, value = pair.partition("=")
        options[key] = _number(value)
    try:
        dataset = reasoning_gym.create_dataset(name, size=size, seed=seed, **options)
    except Exception as exc:  # noqa: BLE001 - unknown generator names come back as various errors
        raise DataError(f"reasoning-gym dataset {name!r} cannot be created: {exc}") from None
    rows = []
    for index, item in enumerate(dataset):
        metadata = item.get("metadata", {})
        rows.append({"id": f"rg-{name}-{seed}-{index}",
                     "content": [{"role": "user", "content": math_user_message(item["question"])}],
                     "answer": str(item["answer"]), "solution": metadata.get("answer_cot")})
    return rows


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
