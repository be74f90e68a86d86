"""Frozen-model worker groups for the generation-heavy stages (extraction, evaluation, off-policy data,
OEL deployment): `ray.ranks_per_group` ranks that split every `generate` call (WorkerGroup.generate,
per-prompt seeds: the same outputs as one rank), with the configured rollout backend."""

from __future__ import annotations

from opcd.config import DistillConfig
from opcd.pipelines.distill import engine_ranks, rollout_kwargs, worker_kwargs
from opcd.workers.group import WorkerGroup
from opcd.workers.teacher import TeacherWorker


def frozen_group(cfg: DistillConfig, name: str, model_path: str, pool=None) -> WorkerGroup:
    """`pool`: a placement pool with `ray.ranks_per_group` bundles; without one, each rank asks for a GPU
    (none on CPU)."""
    kwargs = {**worker_kwargs(cfg, model_path), **rollout_kwargs(cfg), "cpu_offload": cfg.model.cpu_offload}
    if "vllm" in kwargs:  # prompts here also carry experience, a writer's attempt and its lessons
        experience = cfg.task.experience_max_length
        kwargs["vllm"] = {**kwargs["vllm"], "max_model_len": None if experience <= 0 else
                          kwargs["vllm"]["max_model_len"] + experience + cfg.rollout.max_response_length
                          + cfg.extract.writer_max_tokens}
    placement = {"pool": pool} if pool is not None else {"num_gpus": 1 if cfg.ray.gpus_per_node > 0 else 0}
    return WorkerGroup(name, TeacherWorker, kwargs, world_size=cfg.ray.ranks_per_group,
                       ranks_per_engine=engine_ranks(cfg), collective_timeout_s=cfg.ray.collective_timeout_s,
                       **placement)
