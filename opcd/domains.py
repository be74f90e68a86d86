"""What a run learns from and is evaluated on: a dataset or a text game, behind one small interface.

Every pipeline asks its `Domain` for the same things and never tests which kind it holds:

* `training_source()`: the rollout source a training step draws from (opcd/sources.py);
* `evaluate(...)`: the held-out score of a worker group (the test rows, or the fixed held-out
  episodes), with or without the context;
* the extraction loop's three questions (opcd/pipelines/extract.py): which items to learn from, the
  held-out score with an experience, and one attempt without experience plus the writer's prompt.

`DatasetDomain` holds rows of a task (opcd/tasks/); `GameDomain` a game player (opcd/games/). Which
one a run uses is decided once, from the config, by `make_domain` in opcd/pipelines/run_setup.py.
Both take plain values (no config) and never touch Ray: a worker group is anything with
`generate(prompts, params, seed)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from opcd.contexts import ITEM_MARKER, ContextSource, with_experience
from opcd.evaluation import EvalResult
from opcd.experience import writer_prompt
from opcd.games.play import GamePlayer, episode_metrics
from opcd.games.prompts import writer_prompt as game_writer_prompt
from opcd.prompts import encode_chat
from opcd.protocol import Example, SamplingParams
from opcd.rows import shuffled_order
from opcd.seeds import training_seeds
from opcd.sources import GameSource, PromptSource, RolloutSource
from opcd.tasks import Task


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


def _decode(tokenizer, generation) -> list[str]:
    ids = generation.response_ids.masked_fill(~generation.response_mask, tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


@dataclass
class DatasetDomain:
    """A task's rows. Training and evaluation use the tokenised examples (prompts over
    task.max_prompt_length dropped); extraction uses the rows themselves, its experience placed in
    the prompt. A pipeline fills only the lists it needs."""

    task: Task
    tokenizer: object
    enable_thinking: bool | None
    seed: int
    batch_size: int
    samples_per_prompt: int
    train_examples: list[Example] = field(default_factory=list)
    eval_examples: list[Example] = field(default_factory=list)
    train_rows: list[dict] = field(default_factory=list)  # extraction stream
    eval_rows: list[dict] = field(default_factory=list)  # extraction held-out set
    settings: dict = field(default_factory=dict)

    @property
    def num_eval_items(self) -> int:
        return len(self.eval_examples)

    def training_source(self) -> PromptSource:
        return PromptSource(self.train_examples, self.batch_size, self.samples_per_prompt, self.seed, self.task,
                            self.tokenizer)

    def rollout_length(self, max_prompt_length: int, max_response_length: int) -> int:
        return max_prompt_length + max_response_length

    def evaluate(self, who: str, group, side: str, params: SamplingParams, seed: int) -> EvalResult:
        """One generation per test row, scored by the task."""
        examples = self.eval_examples
        prompts = [e.student_prompt if side == "student" else e.teacher_prompt for e in examples]
        rows = [e.row for e in examples]
        generation = group.generate(prompts, params, seed)
        texts = _decode(self.tokenizer, generation)
        scores = [self.task.score(text, row) for text, row in zip(texts, rows)]
        samples = [{"prompt": row["content"][-1]["content"], "response": text, "score": score}
                   for row, text, score in zip(rows, texts, scores)]
        return EvalResult(who, sum(scores) / max(len(scores), 1), len(scores),
                          float(generation.response_mask.sum(-1).float().mean()), samples)

    def _prompt(self, row: dict, experience: str) -> list[int]:
        messages = self.task.student_messages(row)
        return encode_chat(self.tokenizer, with_experience(messages, experience) if experience else messages,
                           self.enable_thinking)

    def _solve(self, group, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[str]:
        return _decode(self.tokenizer, group.generate(prompts, params, seed))

    def extraction_stream(self, seed: int, count: int) -> list[dict]:
        order = shuffled_order(len(self.train_rows), seed, 0)[:count]
        return [self.train_rows[i] for i in order]

    def extraction_heldout(self, group, experience: str, params: SamplingParams, seed: int) -> dict:
        texts = self._solve(group, [self._prompt(row, experience) for row in self.eval_rows], params, seed)
        return {"score": sum(self.task.score(t, r) for t, r in zip(texts, self.eval_rows)) / len(self.eval_rows)}

    def extraction_attempt(self, group, row: dict, params: SamplingParams, seed: int, previous: str | None,
                           max_items: int) -> tuple[dict, str]:
        (attempt,) = self._solve(group, [self._prompt(row, "")], params, seed)
        correct = self.task.score(attempt, row)
        prompt = writer_prompt(row["content"][-1]["content"], attempt, correct >= 1.0, str(row["answer"]), previous,
                               max_items)
        return {"problem_id": row.get("id"), "attempt": attempt, "score": correct}, prompt


@dataclass
class GameDomain:
    """A text game: training episodes from the run's seeds (or, for OEL's consolidation, stored
    states answered afresh each step), evaluation on the fixed held-out episodes (pass rate; the
    teacher plays with the first experience file), an extraction item = one new episode."""

    player: GamePlayer
    context: ContextSource
    tokenizer: object
    seed: int
    episodes_per_step: int
    eval_seeds: list[int]
    batch_size: int
    samples_per_prompt: int
    states: list[Example] | None = None  # stored states to train on instead of new episodes
    state_score: object = None  # what a state's answer is scored by (a Task-like `score`)
    settings: dict = field(default_factory=dict)

    @property
    def num_eval_items(self) -> int:
        return len(self.eval_seeds)

    def training_source(self) -> PromptSource | GameSource:
        if self.states is not None:
            return PromptSource(self.states, self.batch_size, self.samples_per_prompt, self.seed, self.state_score,
                                self.tokenizer)
        return GameSource(self.player, self.context, self.episodes_per_step, self.seed)

    def rollout_length(self, max_prompt_length: int, max_response_length: int) -> int:
        if self.player.mode == "trajectory":  # every move and the environment's answer in one sequence
            return max_prompt_length + self.player.max_steps * (max_response_length + 256)
        return max_prompt_length + max_response_length

    def _play(self, group, seeds: list[int], params: SamplingParams, seed: int, experience: str | None):
        return self.player.play(group.generate, seeds, params, seed, experience)

    def _score(self, who: str, group, params: SamplingParams, seed: int, experience: str | None) -> EvalResult:
        """Pass rate over one held-out episode per seed (with `experience` in every prompt when given)."""
        episodes = self._play(group, self.eval_seeds, params, seed, experience)
        figures = episode_metrics(episodes, params.max_new_tokens)
        extra = {k: figures[k] for k in ("turns_per_episode", "invalid_moves_per_episode", "clipped_turn_rate")}
        return EvalResult(who, figures["pass_rate"], len(episodes), figures["tokens_per_turn"],
                          [e.summary() for e in episodes], extra)

    def evaluate(self, who: str, group, side: str, params: SamplingParams, seed: int) -> EvalResult:
        return self._score(who, group, params, seed, self.context.texts[0] if side == "teacher" else None)

    def extraction_stream(self, seed: int, count: int) -> list[int]:
        return [training_seeds(seed, item + 1, 1)[0] for item in range(count)]

    def extraction_heldout(self, group, experience: str, params: SamplingParams, seed: int) -> dict:
        result = self._score("heldout", group, params, seed, experience or None)
        return {"score": result.score, "turns_per_episode": result.extra["turns_per_episode"],
                "tokens_per_turn": result.mean_response_tokens,
                "invalid_moves_per_episode": result.extra["invalid_moves_per_episode"]}

    def extraction_attempt(self, group, game_seed: int, params: SamplingParams, seed: int, previous: str | None,
                           max_items: int) -> tuple[dict, str]:
        """The episode is shown to the writer turn by turn with its outcome."""
        (episode,) = self._play(group, [game_seed], params, seed, None)
        prompt = game_writer_prompt(self.player.rules, [t.past() for t in episode.turns], episode.observation,
                                    episode.success, previous, max_items, ITEM_MARKER)
        return {"episode_seed": game_seed, **episode.summary(), "score": float(episode.success)}, prompt
