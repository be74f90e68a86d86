"""The process-group backend of a worker group (opcd/workers/distributed.py): gloo on CPU, NCCL on GPU,
and both on GPU with model.cpu_offload, where gradient clipping reduces CPU-resident gradients that NCCL
refuses. A CPU build of torch has no NCCL, so the GPU choices are checked at the call, not run."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from opcd.workers import distributed as D


@pytest.mark.parametrize("device_type, cpu_offload, backend", [
    ("cpu", False, "gloo"),
    ("cpu", True, "gloo"),
    ("cuda", False, "nccl"),
    ("cuda", True, "cpu:gloo,cuda:nccl"),
])
def test_backend_choice(device_type, cpu_offload, backend):
    assert D.process_group_backend(device_type, cpu_offload) == backend


@pytest.mark.parametrize("device, cpu_offload, backend", [
    (torch.device("cuda", 0), True, "cpu:gloo,cuda:nccl"),
    (torch.device("cuda", 0), False, "nccl"),
    (torch.device("cpu"), True, "gloo"),
])
def test_init_process_group_joins_with_that_backend(monkeypatch, device, cpu_offload, backend):
    """Regression: with cpu_offload on several GPU ranks the group was NCCL only, so clipping's all-reduce
    over CPU tensors failed."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    rendezvous = D.Rendezvous("127.0.0.1", store.port, "student", timeout_s=12.0)
    D.init_process_group(rendezvous, 1, 2, device, cpu_offload)
    assert [(b, kw["rank"], kw["world_size"], kw["timeout"]) for b, kw in calls] == [
        (backend, 1, 2, timedelta(seconds=12.0))]
