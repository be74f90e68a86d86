"""Several ranks per worker group: a torch.distributed process group per group (gloo on CPU, NCCL on
GPU, both on GPU with model.cpu_offload) and FSDP2 (`fully_shard`) over the model's decoder layers.

How the work is split, so that every rank runs the same sequence of collectives:

* generation: data parallel. Rank r generates a contiguous share of the prompts with per-prompt
  seeds (opcd/workers/group.py), so the union does not depend on the number of ranks. The `hf`
  engine's forwards are FSDP collectives: the ranks run the same number of `generate` calls in step
  (`synced_gpus`); each `vllm` engine runs on its own, after `full_tensors` handed it the weights.
* teacher scoring and the student update: data parallel. The driver sends each rank only its rows, a
  partition balanced by length (protocol.RowShare; a rank handed the whole batch takes sequences
  r, r + N, ...), and every rank runs the same number of micro-batches (a rank short of data runs a
  zero-weight one-token pass).
  The loss is already normalised by the whole step's token count, so gradients must be SUMMED over
  ranks: FSDP2 averages them, hence each rank scales its loss by N (gloo has no pre-multiplied sum),
  and per-rank statistics are summed with an all-reduce.
* start-up: only rank 0 reads the model; the other ranks build it on the meta device and receive
  their shards from rank 0, one tensor at a time (`shard_from_rank0`, docs/memory-plan.md).
* checkpoints: torch.distributed.checkpoint, each rank writing and reading its own shards
  (opcd/workers/checkpoint_io.py); a Hugging Face export gathers one tensor at a time (hf_export.py). A save
  written in the background coordinates over its own gloo group (`checkpoint_group`), so its
  collectives never interleave with the training's on the main one.

The rendezvous is a TCPStore hosted by the driver process (`Rendezvous`), so ranks on any node of the
Ray cluster can join.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from opcd.data.batching import plan_micro_batches
from opcd.errors import ConfigError


DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0  # 30 minutes (docs/failures.md)


def collective_timeout_s(configured: float | None = None) -> float:
    """How long a rank waits in a collective: the config's value, else $NCCL_TIMEOUT (seconds), else 30
    minutes. Read on the driver, so one value reaches every node."""
    if configured is not None:
        return float(configured)
    value = os.environ.get("NCCL_TIMEOUT", "").strip()
    if not value:
        return DEFAULT_COLLECTIVE_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 1e7:
        raise ConfigError(f"NCCL_TIMEOUT={value!r}: expected a number of seconds in (0, 1e7)")
    return seconds


@dataclass(frozen=True)
class Rendezvous:
    host: str
    port: int
    group: str  # a key prefix, so several groups can share one store
    timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S  # collectives of the group's process group

    @classmethod
    def create(cls, group: str, timeout_s: float | None = None) -> tuple["Rendezvous", object]:
        """A driver-hosted TCPStore (kept alive by the caller) and the address the ranks connect to."""
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timedelta(minutes=30))
        return cls(host, port, group, collective_timeout_s(timeout_s)), store


def process_group_backend(device_type: str, cpu_offload: bool = False) -> str:
    """The process group's backend: gloo on CPU, NCCL on GPU, and both on GPU with CPU offload. With
    offload the parameters and gradients live on CPU between uses, so gradient clipping's norm and other
    reductions run on CPU tensors, which NCCL refuses: "cpu:gloo,cuda:nccl" sends each tensor to the
    backend of its device."""
    if device_type != "cuda":
        return "gloo"
    return "cpu:gloo,cuda:nccl" if cpu_offload else "nccl"


def init_process_group(rendezvous: Rendezvous, rank: int, world_size: int, device: torch.device,
                       cpu_offload: bool = False) -> None:
    """Join the group's process group on the backend for `device` and `cpu_offload` (process_group_backend)."""
    store = dist.PrefixStore(rendezvous.group, dist.TCPStore(rendezvous.host, rendezvous.port, is_master=False,
                                                             timeout=timedelta(minutes=30)))
    backend = process_group_backend(device.type, cpu_offload)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=rendezvous.timeout_s))


@functools.cache
def checkpoint_group(timeout_s: float) -> dist.ProcessGroup:
    """A second process group over the same ranks, on gloo, for checkpoints written in a background
    thread: two threads issuing collectives on one group can pair one rank's planning message with
    another rank's all-gather, and torch.distributed.checkpoint coordinates on CPU, which NCCL refuses.
    Created by every rank at its first background save (the ranks save together, so in the same order)."""
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face causal LM (the units FSDP2 shards one at a time)."""
    base = getattr(model, "model", None) or getattr(model, "transformer", None)
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard")


def shard(model, param_dtype: torch.dtype | None = None, cpu_offload: bool = False,
          activation_checkpointing: bool = False):
    """fully_shard every decoder layer, then the root. `param_dtype`: bf16 compute with fp32 master
    weights and fp32 gradient reduction (GPU); `cpu_offload`: parameters, gradients and optimizer
    state live on CPU between uses."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    options = {}
    if param_dtype is not None:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    register_fsdp_forward_method(model, "generate")
    return model


def shard_from_rank0(model, device: torch.device, param_dtype: torch.dtype | None = None, cpu_offload: bool = False,
                     activation_checkpointing: bool = False):
    """`shard` a model that only rank 0 loaded (the others built it on the meta device,
    models.build_causal_lm_on_meta), then fill every rank's shards from rank 0's weights, one tensor
    at a time, so no other rank ever holds the whole model in host memory. Buffers outside the state
    dict (rotary inv_freq) are broadcast too. Every rank ends with what loading the file gives."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = model.state_dict() if dist.get_rank() == 0 else {}  # references: rank 0 holds no second copy
    shard(model, param_dtype, cpu_offload, activation_checkpointing)
    if any(t.is_meta for t in _tensors(model)):
        # the device, as fully_shard did for rank 0: its buffers stay there even with offload, and
        # FSDP2's own _apply moves the re-created shards to (pinned) CPU under its offload policy
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    in_state_dict = set(model.state_dict().keys())
    for name, buffer in model.named_buffers():
        if name not in in_state_dict:
            dist.broadcast(buffer, src=0)
    return model


def _tensors(model):
    yield from model.parameters()
    yield from model.buffers()


def release(model) -> None:
    """FSDP2 keeps the root's parameters gathered after its forward, expecting a backward to use
    them; after a forward with none (scoring, a check) they are released here. No-op unsharded."""
    if hasattr(model, "reshard"):
        model.reshard()


def my_indices(count: int, rank: int, world_size: int) -> list[int]:
    return list(range(rank, count, world_size))


def rank_micro_batches(count: int, rank: int, world_size: int, plan) -> tuple[list[list[int]], int]:
    """This rank's micro-batches (`plan(indices)` over its share of the `count` sequences) and the
    number of passes EVERY rank runs: the busiest rank's, at least one. Every rank holds the whole
    batch, so it can plan the others' shares without communicating."""
    plans = [plan(my_indices(count, r, world_size)) for r in range(world_size)]
    return plans[rank], max(1, max(len(p) for p in plans))


def plan_rank_micro_batches(prompts: list[list[int]], response_mask: torch.Tensor, rank: int, world_size: int,
                            size: int, token_budget: int, padded: bool) -> tuple[list[list[int]], int]:
    """`rank_micro_batches` for a batch of prompt + response sequences, planned by count or token budget
    (`padded`: rows reach the model padded to the longest, data.batching.plan_micro_batches)."""
    lengths = [len(p) + int(n) for p, n in zip(prompts, response_mask.sum(-1))]
    return rank_micro_batches(len(prompts), rank, world_size,
                              functools.partial(plan_micro_batches, lengths=lengths, size=size, token_budget=token_budget,
                                                padded=padded))


def share_micro_batches(share, size: int, token_budget: int, padded: bool) -> tuple[list[list[int]], int]:
    """`rank_micro_batches` for a rank that holds only its rows (`protocol.RowShare`, a balanced
    partition): every rank's plan, and this rank's with the rows given as positions in its share."""
    plans = [plan_micro_batches(rows, share.lengths, size, token_budget, padded) for rows in share.assignment]
    mine, steps = plans[share.rank], max(1, max(len(p) for p in plans))
    local = {row: position for position, row in enumerate(share.rows)}
    return [[local[row] for row in micro] for micro in mine], steps


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    packed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    return dict(zip(keys, packed.tolist()))


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0 (CPU tensors); an empty dict on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_tensors(model, dtype: torch.dtype | None = None, skip: set[str] = frozenset()):
    """Every rank: (name, full tensor) for each entry of the sharded model's state dict but those in
    `skip` (the same set on every rank), gathered one at a time (`DTensor.full_tensor`, an all-gather)
    on the compute device, floating ones cast to `dtype` before the gather. A generator:
    a consumer that loads each tensor before taking the next (vLLM's weight loader) never holds more
    than one gathered tensor beyond its own copy of the model. Every rank must consume it whole, in
    order."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    release(model)  # the state dict must hold the sharded parameters, not a forward's gathered root
    for name, value in model.state_dict().items():
        if name in skip:
            continue
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)  # cast the shard, then gather: half the bytes of fp32 masters, same result
        if hasattr(value, "full_tensor"):
            value = value.to(device).full_tensor()  # CPU-offloaded shards: NCCL gathers device tensors
        yield name, value.detach()

