"""Rollout engines: turn prompt token ids into sampled responses from the policy's CURRENT weights.

`hf` (transformers generate, batched with a KV cache) shares the policy's nn.Module, so a weight
sync is free; a `vllm` engine holds its own copy and receives the full state dict after each update.
"""

from __future__ import annotations

from typing import Protocol

from opcd.protocol import Generation, SamplingParams


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> Generation: ...

    def sync_weights(self, named_tensors) -> None: ...
