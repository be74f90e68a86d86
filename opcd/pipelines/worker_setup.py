"""The worker groups a pipeline starts, from the config: the workers' specs (opcd/workers/spec.py), the
rollout context each model needs, ranks per group and per engine, placement pools
(opcd/workers/placement.py) and groups on them, and the one-line failure that names the last
checkpoint. Nothing here builds a domain: it is handed one (opcd/pipelines/domain_setup.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from opcd.config import DistillConfig
from opcd.domains import Domain
from opcd.errors import WorkerError
from opcd.runs.checkpoint import latest_checkpoint
from opcd.workers.frozen import FrozenModelWorker
from opcd.workers.group import WorkerGroup
from opcd.workers.placement import make_pools, remove_pools
from opcd.workers.spec import WorkerSpec


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
