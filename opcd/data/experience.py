"""Experiential knowledge: the writer's prompt, parsing its output into items, and choosing the best
experience of an extraction run. Pure functions; the loop that drives a model is
`opcd/pipelines/extract.py`.

Departures from the reference: the writer is told whether the attempt was right and what the
correct answer is (the reference's writer sees the interaction only); selecting the best
experience, which the reference leaves to the user, is automatic (held-out score, ties to the
shorter text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from opcd.data.contexts import ITEM_MARKER, join_items, split_items
from opcd.data.prompts import strip_thinking

WRITER_TEMPLATE = (
    "You are reviewing one attempt at a problem in order to write down lessons that will help with "
    "similar problems later.\n\n"
    "Problem:\n{problem}\n\n"
    "Attempt:\n{attempt}\n\n"
    "Outcome: the attempt was {outcome}. The correct answer is {answer}.\n\n"
    "{previous}"
    "Write {max_items} short, general lesson(s) that would help on similar problems. Do not restate "
    "this problem's numbers. Put each lesson on its own line starting with \"{marker} \"."
)
WRITER_PREFIX = f"{ITEM_MARKER} "  # the writer's response is started with this
PREVIOUS_BLOCK = "Lessons written so far (do not repeat them):\n{experience}\n\n"

_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+(.*\S)\s*$")


def writer_prompt(problem: str, attempt: str, correct: bool, answer: str, previous: str | None,
                  max_items: int) -> str:
    return WRITER_TEMPLATE.format(
        problem=problem.strip(), attempt=strip_thinking(attempt).strip() or "(empty)",
        outcome="correct" if correct else "wrong", answer=answer,
        previous=PREVIOUS_BLOCK.format(experience=previous.strip()) if previous and previous.strip() else "",
        max_items="one or two" if max_items >= 2 else "one", marker=ITEM_MARKER)


def parse_writer_items(text: str, max_items: int) -> list[str]:
    """New experience items from the writer's output, each as `"[exp] <lesson>"`.

    Lines starting with the marker count (a line may hold several markers: each starts an item);
    a writer that ignored the marker but wrote a bulleted or numbered list is read from its bullets;
    anything else yields no item. The thinking block is dropped first. At most `max_items`.
    """
    visible = strip_thinking(text)
    items = [f"{ITEM_MARKER} {lesson}" for lesson in _marked_lessons(visible)]
    if not items:
        items = [f"{ITEM_MARKER} {m.group(1)}" for line in visible.splitlines() if (m := _BULLET.match(line))]
    return items[:max_items]


def _marked_lessons(text: str) -> list[str]:
    """Lessons after each marker; a marker alone at the end of its line takes the next non-empty line."""
    lessons, waiting = [], False
    for line in text.splitlines():
        if ITEM_MARKER not in line:
            if waiting and line.strip():
                lessons.append(" ".join(line.split()))
                waiting = False
            continue
        pieces = [" ".join(p.split()).strip(" -:") for p in line.split(ITEM_MARKER)[1:]]
        lessons += [p for p in pieces if p]
        waiting = not pieces[-1]
    return lessons


def append_items(experience: str, new_items: list[str]) -> str:
    return join_items(split_items(experience) + new_items)


@dataclass(frozen=True)
class Candidate:
    seed: int
    step: int  # items consumed (0 = no experience)
    score: float  # held-out task metric with this experience
    path: str
    length: int  # characters


def best_candidate(candidates: list[Candidate]) -> Candidate:
    """Highest held-out score among experiences with at least one item; ties go to the shorter text,
    then the earlier step and seed (deterministic)."""
    usable = [c for c in candidates if c.step > 0 and c.length > 0]
    if not usable:
        raise ValueError("no experience with at least one item was written")
    return min(usable, key=lambda c: (-c.score, c.length, c.step, c.seed))
