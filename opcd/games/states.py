"""Stored game states (OEL's deploy phase): every situation a policy met while playing without
experience, saved as JSON lines so a later consolidation can train on exactly those situations.

A state row: {"key": "game:<seed>:turn:<i>", "seed", "turn", "history": [PastTurn fields...],
"observation": board, "remaining": moves left}.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

from opcd.data.contexts import ContextSource
from opcd.errors import DataError
from opcd.games.actions import parse_action
from opcd.games.play import Episode, GamePlayer
from opcd.games.prompts import PastTurn
from opcd.protocol import Example
from opcd.data.files import check_unicode, read_text

_PAST_FIELDS = {f.name for f in fields(PastTurn)}


class MoveFormat:
    """The score logged while training on stored states: the share of answers holding a valid
    bracketed move (a state has no reference answer to grade against)."""

    name = "move_format"

    def score(self, response: str, row: dict) -> float:
        return float(parse_action(response) is not None)


def state_rows(episodes: list[Episode]) -> list[dict]:
    rows = []
    for episode in episodes:
        for index, turn in enumerate(episode.turns):
            rows.append({"key": f"game:{episode.seed}:turn:{index}", "seed": episode.seed, "turn": index,
                         "history": [asdict(t.past()) for t in episode.turns[:index]],
                         "observation": turn.observation, "remaining": turn.remaining})
    return rows


def read_states(path: str | Path) -> list[dict]:
    """State rows of a states.jsonl file, checked (file, line and field named on error)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"game states file not found: {path} (expected the states.jsonl written by a deploy phase)")
    rows = []
    for number, line in enumerate(read_text(file).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
        except RecursionError:
            raise DataError(f"{path}:{number}: JSON nested too deeply to read") from None
        check_unicode(row, f"{path}:{number}")
        for key, kind in (("observation", str), ("remaining", int), ("history", list)):
            if not isinstance(row.get(key) if isinstance(row, dict) else None, kind):
                raise DataError(f"{path}:{number}: field {key!r} missing or not a {kind.__name__}")
        for past in row["history"]:
            if not isinstance(past, dict) or set(past) - _PAST_FIELDS or "observation" not in past:
                raise DataError(f"{path}:{number}: a history entry must hold {sorted(_PAST_FIELDS)}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no states")
    return rows


def state_examples(rows: list[dict], player: GamePlayer, context: ContextSource, seed: int) -> list[Example]:
    """Student prompt = the state's turn prompt without experience; teacher prompt = the same with one
    experience file sampled per state."""
    examples = []
    for index, row in enumerate(rows):
        history = [PastTurn(**past) for past in row["history"]]
        student = player.state_prompt(history, row["observation"], row["remaining"], None)
        teacher = player.state_prompt(history, row["observation"], row["remaining"], context.text_for(index, seed))
        examples.append(Example(row, student, teacher))
    return examples
