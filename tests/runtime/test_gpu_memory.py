"""opcd/runtime/gpu_memory.py: a worker's peak GPU memory per step (the trainer's use of it: tests/test_faults_on_cpu.py)."""

import pytest
import torch

from opcd.runtime import gpu_memory


def test_reading_is_empty_on_cpu():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA already in use in this process")
    assert gpu_memory.read_and_reset() == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_peaks_are_per_reading_on_gpu():
    """A step's peak, not the process's: after a reading, a smaller allocation is what the next one reports."""
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB, freed before the reading
    del big
    first = gpu_memory.read_and_reset()
    small = torch.empty(16 * 2**20, dtype=torch.uint8, device="cuda")  # 16 MiB
    second = gpu_memory.read_and_reset()
    assert first["peak_allocated_gb"] >= 0.25 and first["peak_reserved_gb"] >= first["peak_allocated_gb"]
    assert second["peak_allocated_gb"] < 0.25
    del small
