"""System-prompt distillation tasks: medical multiple choice and safety judgement.

Both tasks ask the model to put its final answer inside `<answer></answer>`
tags. This module builds the user messages for their rows, parses the tagged
answer out of a response, and scores one response against a row's ground truth.
"""

import re
from dataclasses import dataclass

from opcd.errors import DataError

CHOICE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Non-greedy and DOTALL so that a multi-line answer is captured but two tagged
# answers in one response stay separate (we score the last one).
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)

# Words a model may put before the letter, e.g. "<answer>Option B</answer>".
_CHOICE_PREFIX = re.compile(r"^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is)?\s*[:\-]?\s*", re.IGNORECASE)

# An upper-case letter counts when it is not the start of a longer word;
# a lower-case one only when it stands alone or is followed by ")", "." or ":",
# because "a" is also the English article ("a fracture of ...").
_UPPER_CHOICE = re.compile(r"^[(\[]?([A-Z])(?![A-Za-z])")
_LOWER_CHOICE = re.compile(r"^[(\[]?([a-z])(?:$|[).:\]])")

_YES_NO = re.compile(r"^[^a-z]*(yes|no)(?![a-z])", re.IGNORECASE)


def medmcqa_user_message(question: str, options: list[str]) -> str:
    """The user turn for a multiple-choice question: question, lettered options, answer format."""
    if not options or len(options) > len(CHOICE_LETTERS):
        raise ValueError(f"a multiple-choice question needs 1-{len(CHOICE_LETTERS)} options, got {len(options)}")
    lines = [f"{letter}) {option.strip()}" for letter, option in zip(CHOICE_LETTERS, options)]
    return (
        f"{question.strip()}\n\n"
        + "\n".join(lines)
        # No example letter in the instruction: a small model tends to copy it.
        + "\n\nThink through the options briefly, then give the letter of the single best option "
        "inside <answer></answer> tags."
    )


def parse_answer_tag(text: str) -> str | None:
    """Stripped content of the LAST `<answer>...</answer>` in `text`; None if absent or empty."""
    found = _ANSWER_TAG.findall(text or "")
    if not found:
        return None
    answer = found[-1].strip()
    return answer or None


def parse_choice_letter(answer: str | None) -> str | None:
    """The option letter at the start of a tagged answer ("B) Radial nerve" -> "B"), upper-cased."""
    if answer is None:
        return None
    body = _CHOICE_PREFIX.sub("", answer.strip())
    match = _UPPER_CHOICE.match(body) or _LOWER_CHOICE.match(body)
    return match.group(1).upper() if match else None


def parse_yes_no(answer: str | None) -> str | None:
    """"yes" or "no" when a tagged answer starts with that word (any case), else None."""
    if answer is None:
        return None
    match = _YES_NO.match(answer.strip())
    return match.group(1).lower() if match else None


def _expected(row: dict, task: str) -> str:
    """The row's ground-truth answer, which these tasks cannot score without."""
    answer = row.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(f"{task} row needs a string 'answer' to be scored, got {answer!r}")
    return answer.strip()


@dataclass(frozen=True)
class MedMCQATask:
    """Medical multiple choice; the answer is a letter A-D."""

    name: str = "medmcqa"

    def student_messages(self, row: dict) -> list[dict]:
        return [dict(message) for message in row["content"]]

    def answer_format_error(self, answer: str | None) -> str | None:
        ok = isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in CHOICE_LETTERS
        return None if ok else "an option letter such as 'B'"

    def score(self, response: str, row: dict) -> float:
        letter = parse_choice_letter(parse_answer_tag(response))
        return 1.0 if letter is not None and letter == _expected(row, self.name).upper() else 0.0


@dataclass(frozen=True)
class SafetyTask:
    """Is complying with a request harmful? The answer is "yes" (harmful) or "no" (benign)."""

    name: str = "safety"

    def student_messages(self, row: dict) -> list[dict]:
        return [dict(message) for message in row["content"]]

    def answer_format_error(self, answer: str | None) -> str | None:
        return None if isinstance(answer, str) and answer.strip().lower() in ("yes", "no") else "'yes' or 'no'"

    def score(self, response: str, row: dict) -> float:
        verdict = parse_yes_no(parse_answer_tag(response))
        return 1.0 if verdict is not None and verdict == _expected(row, self.name).lower() else 0.0


def medmcqa_row(record: dict, where: str) -> dict:
    """A dataset row built from an `openlifescienceai/medmcqa` record; its columns are kept."""
    cop = record.get("cop")
    if not isinstance(cop, int) or not 0 <= cop <= 3:
        # The hub's test split hides the labels (cop = -1); its validation split has them.
        raise DataError(
            f"{where}: field 'cop' must be an option index 0-3, got {cop!r} "
            "(the test split has no labels; use 'validation')"
        )
    options = [record[key] for key in ("opa", "opb", "opc", "opd")]
    return {
        **record,
        "content": [{"role": "user", "content": medmcqa_user_message(record["question"], options)}],
        "answer": CHOICE_LETTERS[cop],
    }
