"""Start-up of a sharded group without every rank reading the model (ModelWorker.load_model, place,
distributed.shard_from_rank0): rank 0 loads the file, rank 1 builds the architecture on the meta device
and gets its shards from rank 0. Two gloo ranks (spawned processes, no Ray): each rank's gathered state,
its buffers, tied weights, attention and generation config equal the model loaded from disk, exactly."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from opcd.models import load_causal_lm
from opcd.workers.distributed import Rendezvous
from opcd.workers.frozen import FrozenModelWorker
from opcd.workers.spec import WorkerSpec
from opcd.workers.student import StudentWorker

pytestmark = pytest.mark.slow


def _check_rank(rank: int, worker_cls, spec: WorkerSpec, rendezvous: Rendezvous) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    worker = worker_cls(spec, rank, 2, rendezvous)
    model = worker.model
    gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    disk = load_causal_lm(spec.model_path, spec.dtype)
    expected = disk.state_dict()
    assert gathered.keys() == expected.keys()
    for name, value in expected.items():
        assert gathered[name].dtype == value.dtype and torch.equal(gathered[name], value), name
    disk_buffers = dict(disk.named_buffers())
    buffers = dict(model.named_buffers())
    assert buffers.keys() == disk_buffers.keys() and any("inv_freq" in name for name in buffers)
    for name, value in disk_buffers.items():
        assert torch.equal(buffers[name].cpu(), value), name
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert disk.lm_head.weight is disk.model.embed_tokens.weight
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config._attn_implementation == disk.config._attn_implementation
    assert model.generation_config.to_dict() == disk.generation_config.to_dict()
    dist.barrier()  # neither rank leaves while the other still gathers
    dist.destroy_process_group()


@pytest.mark.parametrize("worker_cls", [StudentWorker, FrozenModelWorker])
def test_two_ranks_hold_exactly_the_file_weights(worker_cls, tiny_model, monkeypatch):
    """model.cpu_offload is left out: FSDP2 pins the offloaded shards that `to_empty` re-creates, which
    needs an accelerator (not testable on CPU; not measured on GPU)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the spawned ranks: CPU and gloo on any machine
    spec = WorkerSpec.build(str(tiny_model), num_threads=1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(minutes=5))
    mp.spawn(_check_rank, args=(worker_cls, spec, Rendezvous("127.0.0.1", port, "load")), nprocs=2, join=True)
    del store
