"""Rollout engines: turn prompt token ids into sampled responses from the policy's CURRENT weights.

`hf` (transformers generate, batched with a KV cache) shares the policy's nn.Module, so a weight
sync is free; a `vllm` engine holds its own copy and receives the full state dict after each update.

Seeds are per prompt: prompt i of a call with seed s samples with `prompt_seed(s, i)`, whatever else
is in the batch. So a call split over ranks (rank r taking prompts [a, b) with seed
`prompt_seed(s, a)`, opcd/workers/group.py) samples the same tokens as one rank taking them all.
"""

from __future__ import annotations

from typing import Protocol

import torch

from opcd.protocol import Generation, SamplingParams
from opcd.data.seeds import prompt_seed  # noqa: F401 (the engines' and WorkerGroup's per-prompt seeds)

class RolloutEngine(Protocol):
    """What a worker asks of its engine. The memory choreography of a colocated engine on GPU, one
    training step (opcd/workers/student.py):

        generate ... generate   sleep   (teacher scores, student updates, grads freed)
        wake_weights   sync_weights   (allocator cache emptied)   wake_cache   generate ...

    `sleep` discards the engine's weights, not only its KV cache: the sync overwrites them anyway, so
    keeping a host copy would only move the whole model over PCIe twice per step. An engine that
    shares the training module (`shares_module`) needs no sync, and its sleep and wakes are no-ops, as
    they are for any engine on CPU.
    """

    shares_module: bool  # generates with the training nn.Module itself: its weights are always current

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> Generation: ...

    def sync_weights(self, named_tensors) -> None: ...

    def sleep(self) -> None: ...

    def wake_weights(self) -> None: ...

    def wake_cache(self) -> None: ...


def concat_generations(parts: list[Generation], pad_id: int) -> Generation:
    """Generations of consecutive prompt lists -> one, right-padded to the widest (empty parts allowed)."""
    width = max(p.response_ids.shape[1] for p in parts)

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        extra = width - t.shape[1]
        if extra == 0:
            return t
        filler = torch.full((t.shape[0], extra, *t.shape[2:]), value, dtype=t.dtype)
        return torch.cat([t, filler], dim=1)

    def cat(tensors: list[torch.Tensor | None], value) -> torch.Tensor | None:
        if all(t is None for t in tensors):
            return None
        return torch.cat([pad(t, value) for t in tensors])

    return Generation(cat([p.response_ids for p in parts], pad_id), cat([p.response_mask for p in parts], False),
                      cat([p.topk_ids for p in parts], 0), cat([p.loss_mask for p in parts], False))

