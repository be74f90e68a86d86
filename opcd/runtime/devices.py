"""Which devices: how many GPUs a run may use (resolved on the driver, without creating a CUDA
context there) and which device a worker computes on.

The rule: a worker uses a GPU only when Ray gave it one. Ray makes an actor's GPUs visible to it
as cuda:0, 1, ...; an actor that asked for none sees every GPU of its node (Ray 2.60 leaves
CUDA_VISIBLE_DEVICES alone then), so such actors are started with the GPUs hidden (`actor_env`)
and would not pick one anyway (`choose_device`).
"""

from __future__ import annotations

import os
import sys

import torch

from opcd.runtime import cuda_driver


def visible_gpu_count() -> int:
    """GPUs this process may use: none when CUDA_VISIBLE_DEVICES hides them all, else what torch
    counts (through NVML when it can, so no CUDA context is created; 0 on a CPU-only torch)."""
    if not visible_device_list(os.environ.get("CUDA_VISIBLE_DEVICES"), 1):
        return 0
    return torch.cuda.device_count()


def visible_device_list(setting: str | None, fallback: int) -> list[str]:
    """The device entries of a CUDA_VISIBLE_DEVICES value, as CUDA reads it: up to the first invalid
    (negative or empty) entry; unset -> `fallback` devices "0", "1", ..."""
    if setting is None:
        return [str(i) for i in range(fallback)]
    entries = []
    for entry in setting.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        entries.append(entry)
    return entries


def choose_device(ray_gpu_ids: list | None, cuda_available: bool) -> torch.device:
    """A worker's compute device. `ray_gpu_ids`: the GPUs Ray assigned to this actor, or None outside
    a Ray actor (in-process tests and benchmarks: the current CUDA device when there is one)."""
    if ray_gpu_ids is None:
        return torch.device("cuda", torch.cuda.current_device()) if cuda_available else torch.device("cpu")
    if not ray_gpu_ids:
        return torch.device("cpu")
    if not cuda_available:
        raise RuntimeError(f"Ray assigned GPU {ray_gpu_ids} to this worker but torch sees no CUDA device "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, "
                           f"torch {torch.__version__})")
    return torch.device("cuda", 0)  # Ray made exactly the assigned GPUs visible, in order


def worker_device() -> torch.device:
    """This worker's compute device: `choose_device` with the GPUs Ray gave this actor. On a GPU the
    NVIDIA driver is first checked against torch's CUDA build (once per process; too old -> OpcdError)."""
    device = choose_device(_ray_gpu_ids(), torch.cuda.is_available())
    if device.type == "cuda":
        cuda_driver.check_driver_once(torch.version.cuda)
    return device


def actor_env(num_gpus: float) -> dict[str, str]:
    """Environment variables for a Ray actor asking for `num_gpus`: none hides every GPU."""
    return {"CUDA_VISIBLE_DEVICES": ""} if num_gpus == 0 else {}


def describe(device: torch.device) -> str:
    """'cpu' or 'cuda:0 (GPU 3)': the device and, inside a Ray actor, the node's GPU id behind it."""
    ids = _ray_gpu_ids()
    return f"{device} (GPU {','.join(map(str, ids))})" if device.type == "cuda" and ids else str(device)


def _ray_gpu_ids() -> list | None:
    ray = sys.modules.get("ray")  # never import Ray here: in-process workers run without it
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    return list(ray.get_gpu_ids())
