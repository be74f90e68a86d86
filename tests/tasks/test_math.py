"""Math task: answer extraction, symbolic checking with math-verify, thinking blocks, offline data."""

from __future__ import annotations

import pytest

from opcd.tasks.loading import load_rows
from opcd.errors import DataError
from opcd.tasks import get_task
from opcd.tasks.math import extract_final_answer, last_boxed, math_score


@pytest.mark.parametrize("response, expected", [
    ("so 3+4=7\nAnswer: 7", "7"),
    ("Answer: $\\frac{3}{4}$", "\\frac{3}{4}"),
    ("**Answer:** 12", "12"),
    ("first Answer: 3\nthen I fixed it\nAnswer: 5", "5"),
    ("the result is \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),
    ("Answer: \\boxed{9}", "9"),
    ("no final answer here", None),
    ("\\boxed{unclosed", None),
    ("<think>Answer: 1</think>The total is 2.\nAnswer: 2", "2"),
    ("<think>maybe \\boxed{4} ... still thinking", None),
])
def test_extract_final_answer(response, expected):
    assert extract_final_answer(response) == expected


def test_last_boxed_balances_nested_braces():
    assert last_boxed("x \\boxed{\\frac{1}{\\sqrt{2}}} y") == "\\frac{1}{\\sqrt{2}}"


@pytest.mark.parametrize("response, truth, score", [
    ("Answer: 0.5", "1/2", 1.0),
    ("Answer: \\frac{1}{2}", "0.5", 1.0),
    ("\\boxed{288}", "288", 1.0),
    ("Answer: 288.0", "288", 1.0),
    ("Answer: 287", "288", 0.0),
    ("I think it is 288", "288", 0.0),  # no final-answer marker: not credited
    ("Answer: 2\\sqrt{2}", "\\sqrt{8}", 1.0),
    ("Answer: x = 3", "3", 1.0),
])
def test_math_score(response, truth, score):
    assert math_score(response, truth) == score


def test_adversarial_answers_are_never_evaluated(tmp_path):
    """Model text is parsed as math, never run: a Python payload scores 0 and has no effect."""
    marker = tmp_path / "pwned"
    payload = f"Answer: __import__('pathlib').Path('{marker}').write_text('x')"
    assert math_score(payload, "1") == 0.0
    assert not marker.exists()
    assert math_score("Answer: " + "(" * 5000, "1") == 0.0


def test_math_task_scores_rows_and_refuses_missing_truth():
    task = get_task("math")
    row = {"content": [{"role": "user", "content": "1+1?"}], "answer": "2"}
    assert task.score("Answer: 2", row) == 1.0
    assert task.student_messages(row) == row["content"] and task.student_messages(row) is not row["content"]
    with pytest.raises(DataError, match="missing ground truth"):
        task.score("Answer: 2", {**row, "answer": None})


def test_reasoning_gym_rows_are_offline_deterministic_and_split_by_seed():
    train = load_rows("rg:gsm_symbolic", "train", limit=4)
    again = load_rows("rg:gsm_symbolic", "train", limit=4)
    test = load_rows("rg:gsm_symbolic", "test", limit=4)
    assert train == again and len(train) == 4
    assert {r["answer"] for r in train} != {r["answer"] for r in test} or train[0]["content"] != test[0]["content"]
    for row in train:
        assert row["content"][-1]["content"].startswith("Solve the problem below.")
        assert math_score(f"Answer: {row['answer']}", row["answer"]) == 1.0


def test_dapo_layout_is_normalised(tmp_path):
    import json

    path = tmp_path / "dapo.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "What is 6*7?"}],
                                "reward_model": {"ground_truth": "42", "style": "rule"}}) + "\n")
    (row,) = load_rows(str(path))
    assert row["content"][0]["content"] == "What is 6*7?" and row["answer"] == "42"


def test_unknown_reasoning_gym_generator_is_a_data_error():
    with pytest.raises(DataError, match="reasoning-gym dataset 'no_such_generator'"):
        load_rows("rg:no_such_generator", "train", limit=2)


def test_reasoning_gym_generator_options():
    rows = load_rows("rg:basic_arithmetic?min_terms=2&max_terms=2&min_digits=1&max_digits=1", "test", limit=5)
    for row in rows:
        problem = row["content"][-1]["content"].split("\n\n", 1)[1]
        assert problem.startswith("Calculate") and sum(ch.isdigit() for ch in problem) <= 4, problem
