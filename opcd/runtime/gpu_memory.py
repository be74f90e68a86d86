"""GPU memory of the calling process since the last reading: peak allocated and peak reserved, in GiB.

Workers answer `gpu_memory()` once per step; the trainer logs the figures as `perf/<group>_gpu_*`
(opcd/metrics.py). On CPU (or before CUDA was touched) the reading is empty, so nothing is logged.
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
