"""What a run learns from and is evaluated on: a dataset or a text game, behind one small interface.

Every pipeline asks its `Domain` for the same things and never tests which kind it holds:

* `training_source()`: the rollout source a training step draws from (opcd/domains/sources.py);
* `evaluate(...)`: the held-out score of a worker group (the test rows, or the fixed held-out
  episodes), with or without the context;
* the extraction loop's three questions (opcd/pipelines/extract.py): which items to learn from, the
  held-out score with an experience, and one attempt without experience plus the writer's prompt.

`DatasetDomain` (dataset.py) holds rows of a task (opcd/tasks/); `GameDomain` (game.py) a game player
(opcd/games/). Which one a run uses is decided once, from the config, by `make_domain` in opcd/pipelines/domain_setup.py.
Both take plain values (no config) and never touch Ray: a worker group is anything with
`generate(prompts, params, seed)`.
"""

from __future__ import annotations

from typing import Protocol

from opcd.domains.sources import RolloutSource
from opcd.protocol import SamplingParams
from opcd.runs.results import EvalResult


class Domain(Protocol):
    settings: dict  # config sections beyond task/rollout that fix the items (cache keys, shard headers)

    @property
    def num_eval_items(self) -> int: ...

    def training_source(self) -> RolloutSource:
        """The source of every training step's rollouts."""
        ...

    def rollout_length(self, max_prompt_length: int, max_response_length: int) -> int:
        """The longest sequence a rollout engine sees (prompt and everything generated after it)."""
        ...

    def evaluate(self, who: str, group, side: str, params: SamplingParams, seed: int) -> EvalResult:
        """The held-out score of `group`, prompted as the student (no context) or the teacher (`side`)."""
        ...

    def extraction_stream(self, seed: int, count: int) -> list:
        """The items one extraction seed learns from, in order."""
        ...

    def extraction_heldout(self, group, experience: str, params: SamplingParams, seed: int) -> dict:
        """{"score": held-out metric with `experience` ("" = none), and any other figures to record}."""
        ...

    def extraction_attempt(self, group, item, params: SamplingParams, seed: int, previous: str | None,
                           max_items: int) -> tuple[dict, str]:
        """One attempt at `item` without experience -> (its record with a "score", the writer's prompt)."""
        ...


def decode_responses(tokenizer, generation) -> list[str]:
    ids = generation.response_ids.masked_fill(~generation.response_mask, tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)
