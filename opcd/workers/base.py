"""What every model-holding worker sets up the same way: its torch threads, its device, the ranks'
process group, the tokenizer, the model's placement (FSDP2 shards over several ranks, the whole model
on this rank's device otherwise) and its memory readings. StudentWorker and FrozenModelWorker add
what differs: the optimiser and the update, or the frozen scoring."""

from __future__ import annotations

import os

import torch

from opcd.models import build_causal_lm_on_meta, load_causal_lm, load_tokenizer
from opcd.runtime import gpu_memory
from opcd.runtime.devices import worker_device
from opcd.workers import distributed as D
from opcd.workers.spec import WorkerSpec


def default_threads(cores: int, ranks_on_node: int) -> int:
    """A rank's torch threads when trainer.num_threads is 0: the node's cores shared by its group's
    ranks there. Groups colocated on a node take turns (rollout, scoring, update), so each group gets
    all the cores in its turn; eight ranks each running every core would oversubscribe them 8x."""
    return max(1, cores // max(1, ranks_on_node))


class ModelWorker:
    def __init__(self, spec: WorkerSpec, rank: int = 0, world_size: int = 1, rendezvous=None):
        torch.set_num_threads(spec.trainer.num_threads or default_threads(os.cpu_count() or 1,
                                                                  int(os.environ.get("OPCD_RANKS_ON_NODE", "1"))))
        self.spec = spec
        self.rank, self.world_size = rank, world_size
        self.device = worker_device()
        self.collective_timeout_s = rendezvous.timeout_s if rendezvous is not None else D.DEFAULT_COLLECTIVE_TIMEOUT_S
        if world_size > 1:
            D.init_process_group(rendezvous, rank, world_size, self.device, spec.model.cpu_offload)
        self.tokenizer = load_tokenizer(spec.model_path, spec.model.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id
        self.memory = gpu_memory.PhaseMemory()

    def load_model(self, dtype: str) -> torch.nn.Module:
        """The spec's model in `dtype`, on the host (placed by `place`). In a sharded group only rank 0
        reads the weights; the other ranks build the architecture on the meta device (no host memory)
        and `place` fills their shards from rank 0's copy."""
        m = self.spec.model
        load = build_causal_lm_on_meta if self.world_size > 1 and self.rank != 0 else load_causal_lm
        return load(self.spec.model_path, dtype, m.trust_remote_code, m.attn_implementation)

    def place(self, model: torch.nn.Module, mixed_dtype: torch.dtype | None = None,
              activation_checkpointing: bool = False) -> torch.nn.Module:
        """Shard `model` over the ranks (fully_shard moves the shards to the device, or keeps them on CPU
        with offload; the weights come from rank 0), or move it whole to this rank's device."""
        if self.world_size > 1:
            D.shard_from_rank0(model, self.device, mixed_dtype, self.spec.model.cpu_offload, activation_checkpointing)
        else:
            model.to(self.device)
        return model

    def gpu_memory(self) -> dict[str, float]:
        """Peak GPU memory since the previous call and the device's memory in use after each phase
        (opcd/runtime/gpu_memory.py); {} on CPU."""
        return {**gpu_memory.read_and_reset(), **self.memory.take()}
