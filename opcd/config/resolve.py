"""The hardware step: a validated config's machine-dependent settings decided from a description of
the machine, in one explicit place.

The schema (schema.py) checks what a config says and nothing about where it runs; `resolve` fills
what was left to the machine (`ray.gpus_per_node: null`, `ray.ranks_per_group: 0`, `model.dtype:
auto`, `model.activation_checkpointing: null`, `rollout.backend: auto`, `evaluate.ood_backend: auto`)
and checks what only makes sense once they are known (ranks against GPUs, tensor parallelism). So
`opcd distill --cfg` for a 2x8 cluster gives the same answer on any laptop
(`OPCD_NUM_GPUS=8 OPCD_VLLM=1 opcd distill --cfg ray.nnodes=2 ...`), and tests pass any machine.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from opcd.config.schema import DistillConfig, _check


@dataclass(frozen=True)
class Machine:
    """What `resolve` needs to know about the machine a run starts from."""

    gpus_per_node: int  # GPUs this node shows the run
    vllm_installed: bool  # whether the vLLM engine can be built here

    @classmethod
    def here(cls) -> Machine:
        """This machine, or what OPCD_NUM_GPUS / OPCD_VLLM (0 or 1) say it is: a cluster's config
        resolved on a laptop, or a driver node without the workers' GPUs."""
        gpus = os.environ.get("OPCD_NUM_GPUS", "").strip()
        if gpus:
            _check(gpus.isdigit(), "OPCD_NUM_GPUS", gpus, "a whole number of GPUs per node")
            count = int(gpus)
        else:
            from opcd.runtime.devices import visible_gpu_count

            count = visible_gpu_count()
        vllm = os.environ.get("OPCD_VLLM", "").strip()
        _check(vllm in ("", "0", "1"), "OPCD_VLLM", vllm, "0 or 1 (whether vLLM is installed where the run goes)")
        installed = vllm == "1" if vllm else importlib.util.find_spec("vllm") is not None
        return cls(count, installed)


def resolve(cfg: DistillConfig, machine: Machine) -> DistillConfig:
    """Decide `cfg`'s machine-dependent settings in place for `machine`, check them; -> `cfg`."""
    ray = cfg.ray
    if ray.gpus_per_node is None:
        ray.gpus_per_node = machine.gpus_per_node
    _check(ray.gpus_per_node >= 0, "ray.gpus_per_node", ray.gpus_per_node,
           "an integer >= 0 (0 = CPU only), or null for the GPUs visible here")
    if ray.ranks_per_group == 0:
        gpus = ray.nnodes * ray.gpus_per_node
        if ray.placement == "separate":
            gpus -= ray.teacher_ranks or gpus // 2
        ray.ranks_per_group = max(1, gpus)
    if ray.gpus_per_node > 0:
        gpus = ray.nnodes * ray.gpus_per_node
        teacher = ray.teacher_ranks or ray.ranks_per_group
        need = max(ray.ranks_per_group, teacher) if ray.placement == "colocate" else ray.ranks_per_group + teacher
        _check(need <= gpus, "ray.ranks_per_group", ray.ranks_per_group,
               f"at most {gpus} GPU ranks in all (ray.nnodes x ray.gpus_per_node; {ray.placement} placement "
               f"with {teacher} teacher ranks needs {need})")
    _resolve_auto(cfg, machine)
    tp = cfg.rollout.vllm_tensor_parallel_size
    if tp > 1:
        _check(cfg.rollout.backend == "vllm", "rollout.vllm_tensor_parallel_size", tp, "1 unless rollout.backend=vllm")
        _check(ray.gpus_per_node > 0, "rollout.vllm_tensor_parallel_size", tp,
               "1 on CPU (tensor parallelism splits a model over GPUs; set ray.gpus_per_node)")
        _check(ray.ranks_per_group % tp == 0 and tp <= ray.gpus_per_node, "rollout.vllm_tensor_parallel_size", tp,
               f"a divisor of ray.ranks_per_group={ray.ranks_per_group} and at most "
               f"ray.gpus_per_node={ray.gpus_per_node} (an engine's GPUs are on one node)")
    return cfg


def _resolve_auto(cfg: DistillConfig, machine: Machine) -> None:
    """The `auto` settings, decided by whether the run has GPUs (ray.gpus_per_node > 0), so that `--cfg`
    and the saved config.yaml show what runs: GPU = bf16, the vLLM rollout (when vLLM is installed),
    activation checkpointing; CPU = fp32, transformers generate, no checkpointing."""
    gpu = cfg.ray.gpus_per_node > 0
    if cfg.model.dtype == "auto":
        cfg.model.dtype = "bfloat16" if gpu else "float32"
    if cfg.model.activation_checkpointing is None:
        cfg.model.activation_checkpointing = gpu
    vllm = gpu and machine.vllm_installed
    if cfg.rollout.backend == "auto":
        cfg.rollout.backend = "vllm" if vllm else "hf"
    if cfg.evaluate.ood_backend == "auto":
        cfg.evaluate.ood_backend = "vllm" if vllm else "hf"
