"""Experience writer prompts, parsing the writer's output, and automatic best-experience selection."""

from __future__ import annotations

import pytest

from opcd.data.contexts import split_items
from opcd.data.experience import (Candidate, append_items, best_candidate, parse_writer_items,
                             writer_prompt)


@pytest.mark.parametrize("output, expected", [
    ("[exp] Check units.\n[exp] Restate the question.", ["[exp] Check units.", "[exp] Restate the question."]),
    ("[exp] one [exp] two", ["[exp] one", "[exp] two"]),  # several markers on a line
    ("[exp] \nThe marker's lesson is on the next line.", ["[exp] The marker's lesson is on the next line."]),
    ("<think>[exp] thought, not a lesson</think>[exp] visible", ["[exp] visible"]),
    ("Here are lessons:\n- Draw a table.\n2. Verify.", ["[exp] Draw a table.", "[exp] Verify."]),  # bullets
    ("Just prose without any list.", []),
    ("", []),
    ("[exp]    \n\n", []),
])
def test_parse_writer_items(output, expected):
    assert parse_writer_items(output, max_items=5) == expected


def test_parse_keeps_at_most_max_items():
    assert parse_writer_items("[exp] a\n[exp] b\n[exp] c", max_items=2) == ["[exp] a", "[exp] b"]


def test_writer_prompt_golden():
    prompt = writer_prompt("What is 2+2?", "<think>hmm</think>2+2=5\nAnswer: 5", False, "4", None, 2)
    assert prompt == (
        "You are reviewing one attempt at a problem in order to write down lessons that will help with "
        "similar problems later.\n\nProblem:\nWhat is 2+2?\n\nAttempt:\n2+2=5\nAnswer: 5\n\n"
        "Outcome: the attempt was wrong. The correct answer is 4.\n\n"
        "Write one or two short, general lesson(s) that would help on similar problems. Do not restate "
        "this problem's numbers. Put each lesson on its own line starting with \"[exp] \".")
    with_previous = writer_prompt("p", "a", True, "1", "[exp] old lesson", 1)
    assert "Lessons written so far (do not repeat them):\n[exp] old lesson\n\n" in with_previous
    assert "the attempt was correct" in with_previous and "Write one short" in with_previous


def test_append_items_keeps_order():
    text = append_items("[exp] first", ["[exp] second", "[exp] third"])
    assert split_items(text) == ["[exp] first", "[exp] second", "[exp] third"]
    assert append_items("", ["[exp] only"]) == "[exp] only"


def test_best_candidate_highest_score_then_shortest():
    candidates = [Candidate(0, 0, 0.9, "none", 0),  # no experience: never selected
                  Candidate(0, 1, 0.5, "a", 50), Candidate(0, 2, 0.7, "b", 90),
                  Candidate(1, 3, 0.7, "c", 40), Candidate(1, 4, 0.6, "d", 10)]
    assert best_candidate(candidates).path == "c"
    tie = [Candidate(0, 2, 0.5, "x", 40), Candidate(1, 1, 0.5, "y", 40)]
    assert best_candidate(tie).path == "y"  # same score and length: the earlier step
    with pytest.raises(ValueError, match="no experience"):
        best_candidate([Candidate(0, 0, 1.0, "none", 0), Candidate(0, 1, 1.0, "empty", 0)])
