"""What the model reads at each turn of a text game, and what the experience writer reads after one.

Two layouts (method.md §4):

* per turn (the reference): every turn is ONE user message holding the rules, the game so far (each
  earlier board, the move played and what happened) and the current board, ending with a request
  for a bracketed move. The teacher's message has an experience block between the rules and the
  game situation.
* trajectory: the first user message holds the rules and the first board; every later user message
  holds only what the last move did and the new board. The teacher's first message carries the
  experience block.

Pure functions of strings; the token-level assembly is in `opcd/games/play.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from opcd.data.prompts import strip_thinking

EXPERIENCE_BLOCK = (
    "Lessons written after earlier games of this kind:\n{experience}\n"
    "Use the lessons that fit the situation below.\n\n"
)
REQUEST = ("{left} left. Think briefly if it helps, then give your next move as exactly one of "
           "[up], [down], [left] or [right].")


@dataclass(frozen=True)
class PastTurn:
    observation: str  # the board the move was played on
    response: str  # the model's whole answer
    action: str | None  # the move parsed from it (None: no valid move)
    feedback: str  # what the environment said about it
    invalid: bool = False  # the answer held no valid move


def moves_left(count: int) -> str:
    return "One move" if count == 1 else f"{count} moves"


def experience_block(experience: str | None) -> str:
    return EXPERIENCE_BLOCK.format(experience=experience.strip()) if experience and experience.strip() else ""


def _move_label(turn: PastTurn) -> str:
    if turn.invalid:
        return "no valid move"
    return f"[{turn.action}]" if turn.action else "see the answer"


def turn_message(rules: str, history: list[PastTurn], observation: str, remaining: int,
                 experience: str | None = None) -> str:
    """The single user message of a per-turn prompt."""
    parts = [rules.strip()]
    if block := experience_block(experience):
        parts += ["", block.rstrip("\n")]
    if history:
        parts += ["", "The game so far:"]
        for number, past in enumerate(history, 1):
            parts += [f"Board before move {number}:", past.observation,
                      f"Move {number}: {_move_label(past)}. {past.feedback}"]
    parts += ["", "Current board:", observation, "", REQUEST.format(left=moves_left(remaining))]
    return "\n".join(parts)


def first_message(rules: str, observation: str, remaining: int, experience: str | None = None) -> str:
    """The first user message of a trajectory (the same as a per-turn message with no history)."""
    return turn_message(rules, [], observation, remaining, experience)


def next_message(feedback: str, observation: str, remaining: int) -> str:
    """A later user message of a trajectory: what the last move did and the new board."""
    return "\n".join([feedback, "", "Current board:", observation, "", REQUEST.format(left=moves_left(remaining))])


WRITER_TEMPLATE = (
    "You are reviewing one episode of a puzzle game in order to write down lessons that will help "
    "in later episodes.\n\n"
    "Rules of the game:\n{rules}\n\n"
    "The episode, turn by turn:\n{transcript}\n\n"
    "Outcome: {outcome}\n\n"
    "{previous}"
    "Write {max_items} short, general lesson(s) about playing this game well (how to read the board, "
    "which moves are safe, what to avoid). Do not describe this particular board. Put each lesson on "
    "its own line starting with \"{marker} \"."
)
PREVIOUS_BLOCK = "Lessons written so far (do not repeat them):\n{experience}\n\n"


def transcript(turns: list[PastTurn], final_observation: str) -> str:
    """Every turn of an episode (board, the model's answer without its thinking, move, feedback)."""
    lines = []
    for number, turn in enumerate(turns, 1):
        answer = strip_thinking(turn.response).strip() or "(empty)"
        lines += [f"Turn {number} board:", turn.observation, f"Answer: {answer}",
                  f"Move played: {_move_label(turn)}. {turn.feedback}", ""]
    lines += ["Final board:", final_observation]
    return "\n".join(lines)


def writer_prompt(rules: str, turns: list[PastTurn], final_observation: str, success: bool, previous: str | None,
                  max_items: int, marker: str) -> str:
    outcome = ("the puzzle was solved." if success else
               f"the puzzle was NOT solved within {len(turns)} move(s).")
    return WRITER_TEMPLATE.format(
        rules=rules.strip(), transcript=transcript(turns, final_observation), outcome=outcome,
        previous=PREVIOUS_BLOCK.format(experience=previous.strip()) if previous and previous.strip() else "",
        max_items="one or two" if max_items >= 2 else "one", marker=marker)
