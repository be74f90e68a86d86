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

from opcd.config import DistillConfig
from opcd.contexts import ContextSource, load_context
from opcd.domains import DatasetDomain, Domain, GameDomain
from opcd.errors import ConfigError, DataError
from opcd.games.play import GamePlayer
from opcd.games.registry import make_game
from opcd.games.states import MoveFormat, read_states, state_examples
from opcd.models import check_same_tokenizer, check_same_vocab_size, load_tokenizer, resolve_model
from opcd.prompts import encode_chat, token_counter
from opcd.protocol import Example, SamplingParams
from opcd.seeds import heldout_seeds
from opcd.sources import RolloutSource
from opcd.tasks import get_task
from opcd.tasks.loading import load_rows
from opcd.workers.frozen import FrozenModelWorker
from opcd.workers.group import WorkerGroup
from opcd.workers.placement import make_pools, remove_pools
from opcd.workers.spec import TrainSpec, WorkerSpec

log = logging.getLogger("opcd")
REPO_ROOT = Path(__file__).resolve().parents[2]
GAME_TASK = "textgame"  # the task name whose items are game episodes, not dataset rows


def resolve_user_path(path: str) -> str:
    """Relative paths are tried against the working directory, then the opcd checkout (so
    `system_prompts/french.txt` works from anywhere with an editable install)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists() or not (REPO_ROOT / path).exists():
        return str(candidate)
    return str(REPO_ROOT / path)


def build_examples(rows: list[dict], task, context: ContextSource, tokenizer, max_prompt_length: int,
                   seed: int, enable_thinking: bool | None, label: str) -> list[Example]:
    examples, dropped = [], 0
    for index, row in enumerate(rows):
        student_messages = task.student_messages(row)
        student = encode_chat(tokenizer, student_messages, enable_thinking)
        teacher = encode_chat(tokenizer, context.teacher_messages(student_messages, index, seed), enable_thinking)
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
                        cfg.task.experience_max_length, token_counter(tokenizer))


# -- the domain ---------------------------------------------------------------------------------------

Purpose = Literal["train", "evaluate", "extract"]


def make_domain(cfg: DistillConfig, tokenizer, context: ContextSource | None, purpose: Purpose) -> Domain:
    """The run's domain, loaded for `purpose`: training (train examples, evaluation on the first
    trainer.eval_limit test rows), `opcd evaluate` (evaluate.limit test rows) or extraction (the raw
    train rows and extract.heldout_size test rows)."""
    if cfg.task.name == GAME_TASK:  # the one place where datasets and games part
        return _game_domain(cfg, tokenizer, context, purpose)
    return _dataset_domain(cfg, tokenizer, context, purpose)


def require_games(cfg: DistillConfig, command: str) -> None:
    if cfg.task.name != GAME_TASK:
        raise ConfigError(f"config task.name={cfg.task.name!r}: {command} runs text games (expected task={GAME_TASK})")


def _dataset_domain(cfg: DistillConfig, tokenizer, context: ContextSource, purpose: Purpose) -> DatasetDomain:
    t = cfg.task
    task = get_task(t.name)
    domain = DatasetDomain(task, tokenizer, t.enable_thinking, cfg.trainer.seed, cfg.trainer.batch_size, cfg.rollout.n)
    build = dict(task=task, context=context, tokenizer=tokenizer, max_prompt_length=t.max_prompt_length,
                 seed=cfg.trainer.seed, enable_thinking=t.enable_thinking)
    if purpose == "extract":
        heldout = cfg.extract.heldout_size if cfg.extract.heldout_size > 0 else None
        domain.train_rows = load_rows(resolve_user_path(t.train_data), t.train_split)
        domain.eval_rows = load_rows(resolve_user_path(t.test_data), t.test_split, heldout)
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
    return GameDomain(player, context, tokenizer, cfg.trainer.seed, cfg.game.episodes_per_step,
                      heldout_seeds(cfg.game.eval_episodes), cfg.trainer.batch_size, cfg.rollout.n, states,
                      MoveFormat(), settings={"game": asdict(cfg.game)})


# -- workers ------------------------------------------------------------------------------------------

def worker_spec(cfg: DistillConfig, path: str) -> WorkerSpec:
    """The spec of a worker holding the model at `path` (student or frozen), from the config."""
    m, t = cfg.model, cfg.trainer
    return WorkerSpec(model_path=path, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                      attn_implementation=m.attn_implementation, cpu_offload=m.cpu_offload, num_threads=t.num_threads,
                      temperature=cfg.rollout.temperature, micro_batch_size=t.micro_batch_size,
                      micro_batch_tokens=t.micro_batch_tokens, lm_head_chunk_size=cfg.loss.lm_head_chunk_size,
                      padding_free=t.padding_free)


def train_spec(cfg: DistillConfig, domain: Domain, objective: str | None = None) -> TrainSpec:
    """The student's training settings; `objective` replaces loss.kl_loss_type (off-policy)."""
    t = cfg.trainer
    return TrainSpec(lr=t.lr, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                     kl_loss_type=objective or cfg.loss.kl_loss_type, support_mode=cfg.loss.support_mode,
                     aggregation=cfg.loss.aggregation, activation_checkpointing=cfg.model.activation_checkpointing,
                     rollout_backend=cfg.rollout.backend, vllm=vllm_kwargs(cfg, domain))


def vllm_kwargs(cfg: DistillConfig, domain: Domain) -> dict:
    """The student's vLLM engine (rollout.backend=vllm): a context long enough for every prompt."""
    r = cfg.rollout
    if r.backend == "hf":
        return {}
    return {
        "max_model_len": domain.rollout_length(cfg.task.max_prompt_length, r.max_response_length),
        "seed": cfg.trainer.seed, "gpu_memory_utilization": r.vllm_gpu_memory_utilization,
        "cpu_kv_cache_gb": r.vllm_cpu_kv_cache_gb,
        # vLLM refuses more log-probs per token than this (default 20); the support is the policy's top-k
        "max_logprobs": max(cfg.loss.kl_topk, 20),
        "enforce_eager": r.vllm_enforce_eager if r.vllm_enforce_eager is not None else cfg.ray.gpus_per_node == 0}


def teacher_ranks(cfg: DistillConfig) -> int:
    return cfg.ray.teacher_ranks or cfg.ray.ranks_per_group


@contextmanager
def reserved_pools(ranks: dict[str, int], ray_cfg):
    """The groups' placement pools (opcd/workers/placement.py) for the duration of the block."""
    pools = make_pools(ranks, ray_cfg.gpus_per_node > 0, ray_cfg.placement)
    try:
        yield pools
    finally:
        remove_pools(pools.values())


@contextmanager
def frozen_model_group(name: str, cfg: DistillConfig, model_path: str):
    """One single-rank group of the frozen-model worker (generation and scoring) on its own pool,
    shut down and released at the end of the block."""
    with reserved_pools({name: 1}, cfg.ray) as pools:
        group = WorkerGroup(name, FrozenModelWorker, {"spec": worker_spec(cfg, model_path)}, pool=pools[name])
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


def prepare(cfg: DistillConfig) -> Prepared:
    student_path = resolve_model(cfg.model.path)
    teacher_path = resolve_model(cfg.model.teacher_path) if cfg.model.teacher_path else student_path
    tokenizer = load_tokenizer(student_path, cfg.model.trust_remote_code)
    if teacher_path != student_path:
        _check_teacher(cfg, tokenizer, student_path, teacher_path)
    context = load_run_context(cfg, tokenizer)
    domain = make_domain(cfg, tokenizer, context, "train")
    return Prepared(student_path, teacher_path, tokenizer, context, domain, domain.training_source())


def _check_teacher(cfg: DistillConfig, student_tok, student_path: str, teacher_path: str) -> None:
    from transformers import AutoConfig

    teacher_tok = load_tokenizer(teacher_path, cfg.model.trust_remote_code)
    check_same_tokenizer(student_tok, teacher_tok, student_path, teacher_path)
    check_same_vocab_size(AutoConfig.from_pretrained(student_path, trust_remote_code=cfg.model.trust_remote_code),
                          AutoConfig.from_pretrained(teacher_path, trust_remote_code=cfg.model.trust_remote_code),
                          student_path, teacher_path)
