"""What every pipeline shares: user paths, the run's domain (dataset or text game, chosen here once),
tokenised examples, sampling settings, the workers' specs (opcd/workers/spec.py) from the config, and
worker groups on placement pools (opcd/workers/placement.py) for every group any pipeline starts.

Set-up order matters: everything a user can get wrong (context file, data rows, tokenizer mismatch,
game options) is checked on the driver by `prepare` and `make_domain`, before Ray starts or any
worker loads a model.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from opcd.config import GAME_TASK, DistillConfig, check_model_limits
from opcd.data.contexts import ContextSource, load_context
from opcd.domains import Domain
from opcd.domains.dataset import DatasetDomain
from opcd.domains.game import GameDomain
from opcd.errors import ConfigError, DataError, WorkerError
from opcd.games.play import GamePlayer
from opcd.games.registry import make_game
from opcd.games.states import MoveFormat, read_states, state_examples
from opcd.models import (check_same_tokenizer, check_teacher_covers_student, load_model_config, load_tokenizer,
                         resolve_model, vocab_rows)
from opcd.data.prompts import encode_chat, token_counter
from opcd.protocol import Example, SamplingParams
from opcd.data.seeds import heldout_seeds
from opcd.domains.sources import RolloutSource
from opcd.tasks import check_answer, context_placeholders, get_task
from opcd.tasks.loading import load_rows
from opcd.workers.frozen import FrozenModelWorker
from opcd.runs.checkpoint import latest_checkpoint
from opcd.workers.group import WorkerGroup
from opcd.workers.placement import make_pools, remove_pools
from opcd.workers.spec import WorkerSpec

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


def sampling(cfg: DistillConfig, evaluation: bool) -> SamplingParams:
    r = cfg.rollout
    if evaluation:
        return SamplingParams(r.eval_temperature, r.eval_top_p, r.eval_top_k, r.max_response_length)
    record = cfg.loss.kl_topk if cfg.loss.kl_loss_type == "full" and cfg.loss.kl_topk > 0 else 0
    return SamplingParams(r.temperature, r.top_p, r.top_k, r.max_response_length, record_topk=record)


def load_run_context(cfg: DistillConfig, tokenizer) -> ContextSource:
    return load_context(cfg.task.context_kind, resolve_user_path(cfg.task.context_path),
                        cfg.task.experience_max_length, token_counter(tokenizer),
                        context_placeholders(cfg.task.language))


# -- the domain ---------------------------------------------------------------------------------------

Purpose = Literal["train", "evaluate", "extract"]


def make_domain(cfg: DistillConfig, tokenizer, context: ContextSource | None, purpose: Purpose,
                positions: int = 0) -> Domain:
    """The run's domain, loaded for `purpose`: training (train examples, evaluation on the first
    trainer.eval_limit test rows), `opcd evaluate` (evaluate.limit test rows) or extraction (the raw
    train rows and extract.heldout_size rows of the selection set: task.validation_data, else the test
    set). `positions` > 0: the model's positions, which a kept prompt plus a response must fit."""
    if cfg.task.name == GAME_TASK:  # the one place where datasets and games part
        return _game_domain(cfg, tokenizer, context, purpose)
    return _dataset_domain(cfg, tokenizer, context, purpose, positions)


def require_games(cfg: DistillConfig, command: str) -> None:
    if cfg.task.name != GAME_TASK:
        raise ConfigError(f"config task.name={cfg.task.name!r}: {command} runs text games (expected task={GAME_TASK})")


def _dataset_domain(cfg: DistillConfig, tokenizer, context: ContextSource, purpose: Purpose,
                    positions: int) -> DatasetDomain:
    t = cfg.task
    task = get_task(t.name, t.language)
    domain = DatasetDomain(task, tokenizer, t.enable_thinking, cfg.trainer.seed, cfg.trainer.batch_size, cfg.rollout.n)
    build = dict(task=task, context=context, tokenizer=tokenizer, max_prompt_length=t.max_prompt_length,
                 seed=cfg.trainer.seed, enable_thinking=t.enable_thinking,
                 max_total_length=positions - cfg.rollout.max_response_length if positions else None)
    if purpose == "extract":
        heldout = cfg.extract.heldout_size if cfg.extract.heldout_size > 0 else None
        selection, selection_split = t.selection_data
        domain.train_rows = load_rows(resolve_user_path(t.train_data), t.train_split)
        domain.eval_rows = load_rows(resolve_user_path(selection), selection_split, heldout)
        return domain
    limit = cfg.trainer.eval_limit if purpose == "train" else cfg.evaluate.limit
    if purpose == "train":
        train_rows = load_rows(resolve_user_path(t.train_data), t.train_split)
    test_rows = load_rows(resolve_user_path(t.test_data), t.test_split, limit if limit > 0 else None)
    if purpose == "train":
        domain.train_examples = build_examples(train_rows, label=t.train_data, **build)
    domain.eval_examples = build_examples(test_rows, label=t.test_data, **build)
    return domain


def build_player(cfg: DistillConfig, tokenizer) -> GamePlayer:
    """The text game of `cfg.game` (its id and options are checked here, before any model loads)."""
    g = cfg.game
    make_game(g.name, max_steps=g.max_steps, **g.options)
    return GamePlayer(lambda: make_game(g.name, max_steps=g.max_steps, **g.options), tokenizer, g.max_steps, g.mode,
                      cfg.task.enable_thinking, cfg.task.max_prompt_length)


def _game_domain(cfg: DistillConfig, tokenizer, context: ContextSource, purpose: Purpose) -> GameDomain:
    player = build_player(cfg, tokenizer)
    states = None
    if purpose == "train" and cfg.game.states_path:  # OEL: the states a policy visited without experience
        rows = read_states(resolve_user_path(cfg.game.states_path))
        states = state_examples(rows, player, context, cfg.trainer.seed)
    return GameDomain(player=player, context=context, tokenizer=tokenizer, seed=cfg.trainer.seed,
                      episodes_per_step=cfg.game.episodes_per_step, eval_seeds=heldout_seeds(cfg.game.eval_episodes),
                      batch_size=cfg.trainer.batch_size, samples_per_prompt=cfg.rollout.n, states=states,
                      state_score=MoveFormat(), settings={"game": asdict(cfg.game)})


# -- workers ------------------------------------------------------------------------------------------

def generation_spec(cfg: DistillConfig, path: str, max_model_len: int | None, vocab_rows: int | None = None,
                    objective: str | None = None) -> WorkerSpec:
    """A model worker's spec (opcd/workers/spec.py): the config's sections, the configured rollout engine
    with a vLLM context of `max_model_len` tokens (None: the model's own limit); `vocab_rows`: a padded
    teacher scores over the student's rows; `objective` replaces loss.kl_loss_type (off-policy)."""
    return WorkerSpec.from_config(cfg, path, vocab_rows=vocab_rows, max_model_len=max_model_len, objective=objective)


def student_context(cfg: DistillConfig, domain: Domain) -> int:
    """The student's rollout context: every prompt and its response (a whole game in trajectory mode)."""
    return domain.rollout_length(cfg.task.max_prompt_length, cfg.rollout.max_response_length)


def frozen_context(cfg: DistillConfig, domain: Domain) -> int | None:
    """A generating frozen model's context: its prompts also carry experience, a writer's attempt and
    its lessons; None (the model's limit) when the experience budget is unlimited."""
    experience = cfg.task.experience_max_length
    if experience <= 0:
        return None
    return (student_context(cfg, domain) + experience + cfg.rollout.max_response_length
            + cfg.extract.writer_max_tokens)


def engine_ranks(cfg: DistillConfig) -> int:
    """Ranks per rollout engine: vLLM's tensor-parallel size, else 1 (every rank its own engine)."""
    return cfg.rollout.vllm_tensor_parallel_size if cfg.rollout.backend == "vllm" else 1


def teacher_ranks(cfg: DistillConfig) -> int:
    return cfg.ray.teacher_ranks or cfg.ray.ranks_per_group


@contextmanager
def naming_last_checkpoint(run_dir: Path):
    """A worker failure inside the block ends with the run's last intact checkpoint in its line: what a
    rerun of the same command resumes from."""
    try:
        yield
    except WorkerError as exc:
        found = latest_checkpoint(run_dir)
        where = f"last intact checkpoint: {found[1]}" if found else f"no checkpoint in {run_dir} yet"
        raise WorkerError(f"{exc}; {where} (run the same command to resume)") from exc.__cause__


@contextmanager
def reserved_pools(ranks: dict[str, int], ray_cfg):
    """The groups' placement pools (opcd/workers/placement.py) for the duration of the block."""
    pools = make_pools(ranks, ray_cfg.gpus_per_node > 0, ray_cfg.placement)
    try:
        yield pools
    finally:
        remove_pools(pools.values())


def generating_group(name: str, cfg: DistillConfig, model_path: str, domain: Domain, pool,
                     vocab_rows: int | None = None) -> WorkerGroup:
    """`ray.ranks_per_group` ranks of the frozen-model worker on `pool`, which split every `generate`
    (WorkerGroup.generate with per-prompt seeds: the same outputs as one rank) with the configured
    rollout backend. `vocab_rows`: a padded teacher scores over the student's rows (WorkerSpec)."""
    return WorkerGroup(name, FrozenModelWorker,
                       {"spec": generation_spec(cfg, model_path, frozen_context(cfg, domain), vocab_rows)},
                       world_size=cfg.ray.ranks_per_group, pool=pool, ranks_per_engine=engine_ranks(cfg),
                       collective_timeout_s=cfg.ray.collective_timeout_s)


@contextmanager
def frozen_model_group(name: str, cfg: DistillConfig, model_path: str, domain: Domain, vocab_rows: int | None = None):
    """A generating group (above) on a pool of its own, shut down and released at the end of the block."""
    with reserved_pools({name: cfg.ray.ranks_per_group}, cfg.ray) as pools:
        group = generating_group(name, cfg, model_path, domain, pools[name], vocab_rows)
        try:
            yield group
        finally:
            group.shutdown()


# -- a training run's set-up --------------------------------------------------------------------------

@dataclass
class Prepared:
    """Everything checked and built on the driver before any worker starts."""

    student_path: str
    teacher_path: str
    tokenizer: object
    context: ContextSource
    domain: Domain  # what the run learns from and is evaluated on
    source: RolloutSource  # the domain's training source
    student_vocab_rows: int | None = None  # set when the teacher's embedding has more rows (it scores over these)


def prepare(cfg: DistillConfig) -> Prepared:
    student_path = resolve_model(cfg.model.path)
    teacher_path = resolve_model(cfg.model.teacher_path) if cfg.model.teacher_path else student_path
    student_config = load_model_config(student_path, cfg.model.trust_remote_code)
    positions = check_model_limits(cfg, student_config, student_path)
    tokenizer = load_tokenizer(student_path, cfg.model.trust_remote_code)
    rows = None
    if teacher_path != student_path:
        rows = _check_teacher(cfg, tokenizer, student_config, student_path, teacher_path)
    context = load_run_context(cfg, tokenizer)
    domain = make_domain(cfg, tokenizer, context, "train", positions)
    return Prepared(student_path, teacher_path, tokenizer, context, domain, domain.training_source(), rows)


def _check_teacher(cfg: DistillConfig, student_tok, student_config, student_path: str, teacher_path: str) -> int | None:
    """Same tokenizer, and a teacher embedding that covers the student's ids; -> the student's row
    count when the teacher has more rows (it then scores over those), else None."""
    teacher_tok = load_tokenizer(teacher_path, cfg.model.trust_remote_code)
    check_same_tokenizer(student_tok, teacher_tok, student_path, teacher_path)
    teacher_config = load_model_config(teacher_path, cfg.model.trust_remote_code)
    check_teacher_covers_student(student_config, teacher_config, student_path, teacher_path)
    student_rows = vocab_rows(student_config)
    return student_rows if vocab_rows(teacher_config) > student_rows else None
