"""The worker groups a pipeline starts, from the config: the workers' specs (opcd/workers/spec.py), the
rollout context each model needs, ranks per group and per engine, placement pools
(opcd/workers/placement.py) and groups on them, and the one-line failure that names the last
checkpoint. Nothing here builds a domain: it is handed one (opcd/pipelines/domain_setup.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from opcd.config import DistillConfig, ExtractConfig, RayConfig, RolloutConfig, TaskConfig
from opcd.domains import Domain
from opcd.errors import WorkerError
from opcd.runs.checkpoint import latest_checkpoint
from opcd.workers.frozen import FrozenModelWorker
from opcd.workers.group import WorkerGroup
from opcd.workers.placement import make_pools, remove_pools
from opcd.workers.spec import WorkerSpec


def frozen_spec(cfg: DistillConfig, model_path: str, domain: Domain, vocab_rows: int | None = None) -> WorkerSpec:
    """The spec of a frozen model that generates (a teacher, a solver, a writer, a deployed policy), its
    vLLM context the one `frozen_context` gives; `vocab_rows`: a padded teacher scores over the
    student's rows (WorkerSpec)."""
    context = frozen_context(domain, cfg.task, cfg.rollout, cfg.extract)
    return WorkerSpec.from_config(cfg, model_path, max_model_len=context, vocab_rows=vocab_rows)


def student_context(domain: Domain, task: TaskConfig, rollout: RolloutConfig) -> int:
    """The student's rollout context: every prompt and its response (a whole game in trajectory mode)."""
    return domain.rollout_length(task.max_prompt_length, rollout.max_response_length)


def frozen_context(domain: Domain, task: TaskConfig, rollout: RolloutConfig, extract: ExtractConfig) -> int | None:
    """A generating frozen model's context: its prompts also carry experience, a writer's attempt and
    its lessons; None (the model's limit) when the experience budget is unlimited."""
    experience = task.experience_max_length
    if experience <= 0:
        return None
    return student_context(domain, task, rollout) + experience + rollout.max_response_length + extract.writer_max_tokens


def engine_ranks(rollout: RolloutConfig) -> int:
    """Ranks per rollout engine: vLLM's tensor-parallel size, else 1 (every rank its own engine)."""
    return rollout.vllm_tensor_parallel_size if rollout.backend == "vllm" else 1


def teacher_ranks(ray_cfg: RayConfig) -> int:
    return ray_cfg.teacher_ranks or ray_cfg.ranks_per_group


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
def reserved_pools(ranks: dict[str, int], ray_cfg: RayConfig):
    """The groups' placement pools (opcd/workers/placement.py) for the duration of the block."""
    pools = make_pools(ranks, ray_cfg.gpus_per_node > 0, ray_cfg.placement)
    try:
        yield pools
    finally:
        remove_pools(pools.values())


def generating_group(name: str, spec: WorkerSpec, ray_cfg: RayConfig, pool) -> WorkerGroup:
    """`ray.ranks_per_group` ranks of the frozen-model worker on `pool`, which split every `generate`
    (WorkerGroup.generate with per-prompt seeds: the same outputs as one rank) with the spec's rollout
    backend."""
    return WorkerGroup(name, FrozenModelWorker, {"spec": spec}, world_size=ray_cfg.ranks_per_group, pool=pool,
                       ranks_per_engine=engine_ranks(spec.rollout), collective_timeout_s=ray_cfg.collective_timeout_s)


@contextmanager
def frozen_model_group(name: str, spec: WorkerSpec, ray_cfg: RayConfig):
    """A generating group (above) on a pool of its own, shut down and released at the end of the block."""
    with reserved_pools({name: ray_cfg.ranks_per_group}, ray_cfg) as pools:
        group = generating_group(name, spec, ray_cfg, pools[name])
        try:
            yield group
        finally:
            group.shutdown()
