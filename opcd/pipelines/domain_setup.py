"""What a run learns from and is evaluated on, built on the driver from the config: user paths, the
run's context (system prompt or experience), the domain (dataset or text game, chosen here once) with
its tokenised examples or game player, whole in its constructor.

Everything a user can get wrong here (context file, data rows, game options) is checked before Ray
starts or any worker loads a model. Nothing here touches Ray or a worker (tests/test_imports.py).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from opcd.config import GAME_TASK, DistillConfig, GameConfig, TaskConfig
from opcd.data.contexts import ContextSource, load_context
from opcd.data.prompts import encode_chat, token_counter
from opcd.data.seeds import heldout_seeds
from opcd.domains import Domain
from opcd.domains.dataset import DatasetDomain
from opcd.domains.game import GameDomain
from opcd.errors import ConfigError, DataError
from opcd.games.play import GamePlayer
from opcd.games.registry import make_game
from opcd.games.states import MoveFormat, read_states, state_examples
from opcd.protocol import Example
from opcd.tasks import check_answer, context_placeholders, get_task
from opcd.tasks.loading import load_rows

log = logging.getLogger("opcd")
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_user_path(path: str) -> str:
    """Relative paths are tried against the working directory, then the opcd checkout (so
    `system_prompts/french.txt` works from anywhere with an editable install)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists() or not (REPO_ROOT / path).exists():
        return str(candidate)
    return str(REPO_ROOT / path)


def build_examples(rows: list[dict], task, context: ContextSource, tokenizer, max_prompt_length: int,
                   seed: int, enable_thinking: bool | None, label: str,
                   max_total_length: int | None = None) -> list[Example]:
    """Encoded prompts of the rows; rows over task.max_prompt_length are dropped (and counted), a row
    kept whose prompt leaves no room for the response in the model's positions is an error."""
    examples, dropped = [], 0
    for index, row in enumerate(rows):
        check_answer(task, row, f"{label} row {index + 1}")
        student_messages = task.student_messages(row)
        student = encode_chat(tokenizer, student_messages, enable_thinking)
        teacher = encode_chat(tokenizer, context.teacher_messages(student_messages, index, seed), enable_thinking)
        longest = max(len(student), len(teacher))
        if max_total_length is not None and max_prompt_length >= longest > max_total_length:
            raise DataError(f"{label} row {index + 1}: a prompt of {longest} tokens plus rollout.max_response_length "
                            f"does not fit the model's positions ({max_total_length} tokens left for the prompt): "
                            f"lower task.max_prompt_length to drop such rows, or rollout.max_response_length")
        if max(len(student), len(teacher)) > max_prompt_length:
            dropped += 1
            continue
        examples.append(Example(row, student, teacher))
    if dropped:
        log.warning("%s: dropped %d of %d rows whose prompt is over task.max_prompt_length=%d",
                    label, dropped, len(rows), max_prompt_length)
    if not examples:
        raise DataError(f"{label}: no usable rows ({dropped} over task.max_prompt_length={max_prompt_length})")
    return examples


def load_run_context(task: TaskConfig, tokenizer) -> ContextSource:
    """The run's context (task.context_kind: a system prompt or experience), read and checked."""
    return load_context(task.context_kind, resolve_user_path(task.context_path), task.experience_max_length,
                        token_counter(tokenizer), context_placeholders(task.language))


# -- the domain ---------------------------------------------------------------------------------------

Purpose = Literal["train", "evaluate", "extract"]


def make_domain(cfg: DistillConfig, tokenizer, context: ContextSource | None, purpose: Purpose,
                positions: int = 0) -> Domain:
    """The run's domain, loaded for `purpose`: training (train examples, evaluation on the first
    trainer.eval_limit test rows), `opcd evaluate` (evaluate.limit test rows) or extraction (the raw
    train rows and extract.heldout_size rows of the selection set: task.validation_data, else the test
    set). `positions` > 0: the model's positions, which a kept prompt plus a response must fit.
    The one place that reads the config's sections for a domain; what it builds takes plain values."""
    shared = dict(seed=cfg.trainer.seed, batch_size=cfg.trainer.batch_size, samples_per_prompt=cfg.rollout.n)
    if cfg.task.name == GAME_TASK:  # the one place where datasets and games part
        return _game_domain(cfg.game, cfg.task, tokenizer, context, with_states=purpose == "train", **shared)
    if purpose == "extract":
        heldout = cfg.extract.heldout_size if cfg.extract.heldout_size > 0 else None
        return _extraction_domain(cfg.task, tokenizer, heldout, **shared)
    limit = cfg.trainer.eval_limit if purpose == "train" else cfg.evaluate.limit
    return _dataset_domain(cfg.task, tokenizer, context, train=purpose == "train", eval_limit=limit,
                           max_total_length=positions - cfg.rollout.max_response_length if positions else None,
                           **shared)


def require_games(task: TaskConfig, command: str) -> None:
    if task.name != GAME_TASK:
        raise ConfigError(f"config task.name={task.name!r}: {command} runs text games (expected task={GAME_TASK})")


def _extraction_domain(t: TaskConfig, tokenizer, heldout: int | None, **shared) -> DatasetDomain:
    selection, selection_split = t.selection_data
    return DatasetDomain(task=get_task(t.name, t.language), tokenizer=tokenizer, enable_thinking=t.enable_thinking,
                         train_rows=load_rows(resolve_user_path(t.train_data), t.train_split),
                         eval_rows=load_rows(resolve_user_path(selection), selection_split, heldout), **shared)


def _dataset_domain(t: TaskConfig, tokenizer, context: ContextSource, *, train: bool, eval_limit: int,
                    max_total_length: int | None, seed: int, **shared) -> DatasetDomain:
    task = get_task(t.name, t.language)
    build = dict(task=task, context=context, tokenizer=tokenizer, max_prompt_length=t.max_prompt_length,
                 seed=seed, enable_thinking=t.enable_thinking, max_total_length=max_total_length)
    train_rows = load_rows(resolve_user_path(t.train_data), t.train_split) if train else []
    test_rows = load_rows(resolve_user_path(t.test_data), t.test_split, eval_limit if eval_limit > 0 else None)
    train_examples = build_examples(train_rows, label=t.train_data, **build) if train else []
    return DatasetDomain(task=task, tokenizer=tokenizer, enable_thinking=t.enable_thinking, seed=seed,
                         train_examples=train_examples,
                         eval_examples=build_examples(test_rows, label=t.test_data, **build), **shared)


def build_player(g: GameConfig, task: TaskConfig, tokenizer) -> GamePlayer:
    """The text game of the config's game section (its id and options are checked here, before any
    model loads); the prompts follow the task section's thinking switch and prompt budget."""
    make_game(g.name, max_steps=g.max_steps, **g.options)
    return GamePlayer(lambda: make_game(g.name, max_steps=g.max_steps, **g.options), tokenizer, g.max_steps, g.mode,
                      task.enable_thinking, task.max_prompt_length)


def _game_domain(g: GameConfig, task: TaskConfig, tokenizer, context: ContextSource, *, with_states: bool,
                 seed: int, batch_size: int, samples_per_prompt: int) -> GameDomain:
    player = build_player(g, task, tokenizer)
    states = None
    if with_states and g.states_path:  # OEL: the states a policy visited without experience
        states = state_examples(read_states(resolve_user_path(g.states_path)), player, context, seed)
    return GameDomain(player=player, context=context, tokenizer=tokenizer, seed=seed,
                      episodes_per_step=g.episodes_per_step, eval_seeds=heldout_seeds(g.eval_episodes),
                      batch_size=batch_size, samples_per_prompt=samples_per_prompt, states=states,
                      state_score=MoveFormat(), settings={"game": asdict(g)})
