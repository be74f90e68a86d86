"""GPU memory readings of a worker, in GiB: the calling process's peaks since the last reading, and the
device's memory in use at the end of each phase of a step.

The phase readings come from `torch.cuda.mem_get_info`, which sees what the driver sees: vLLM's own
pools (allocated outside PyTorch's caching allocator) and other processes on the same card. Workers
answer `gpu_memory()` once per step; the trainer logs the figures as `perf/<group>_gpu_*`
(opcd/metrics.py). On CPU (or before CUDA was touched) the readings are empty, so nothing is logged.
"""

from __future__ import annotations

import torch


def read_and_reset() -> dict[str, float]:
    """{"peak_allocated_gb", "peak_reserved_gb"} since the previous call (the peaks restart here); {} on CPU."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    out = {"peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
           "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}
    torch.cuda.reset_peak_memory_stats()
    return out


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def used_gb() -> float | None:
    """Memory in use on this process's device, by anyone (total - free); None on CPU."""
    if not _cuda_ready():
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def release_cached() -> None:
    """Give PyTorch's cached, unused blocks back to the device, so a neighbour that allocates outside
    PyTorch's allocator (a waking vLLM engine) can have them. A no-op on CPU."""
    if _cuda_ready():
        torch.cuda.empty_cache()


class PhaseMemory:
    """Device memory in use at the end of each phase of the current step: `used_gb_after_<phase>`."""

    def __init__(self):
        self.readings: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        used = used_gb()
        if used is not None:
            self.readings[f"used_gb_after_{phase}"] = used

    def take(self) -> dict[str, float]:
        out, self.readings = self.readings, {}
        return out
