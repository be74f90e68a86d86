"""The `hf` rollout engine: transformers `generate` over a left-padded batch with a KV cache.

It samples from the very module the student trains (no copy, no sync), so every rollout uses the
current weights. The policy's top-k ids are recorded during generation by a logits processor that
sees the raw logits before temperature/top-p/top-k, which saves the separate student forward pass
the reference spends on them (top-k ids do not depend on the temperature).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from opcd.batching import left_pad, strip_after_eos
from opcd.protocol import Generation, SamplingParams


class _RecordTopK(LogitsProcessor):
    def __init__(self, k: int):
        self.k = k
        self.steps: list[torch.Tensor] = []  # each [B, k]

    def __call__(self, input_ids, scores):
        self.steps.append(scores.topk(self.k, dim=-1).indices)
        return scores


class HFRollout:
    def __init__(self, model, tokenizer, batch_size: int = 64, autocast=contextlib.nullcontext,
                 device: torch.device | str | None = None):
        self.model = model
        # where the inputs go: the worker's compute device (FSDP2 with CPU offload keeps parameters on
        # CPU and computes on the GPU), else where the model's parameters are
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.autocast = autocast  # the student's fp32 master weights generate in its compute dtype on GPU
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
        self.batch_size = batch_size  # prompts per generate call: bounds the KV cache

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> Generation:
        torch.manual_seed(seed)  # one seed per call: a resumed run samples the same tokens
        chunks = [self._generate_chunk(prompts[i:i + self.batch_size], params)
                  for i in range(0, len(prompts), self.batch_size)]
        return _concat(chunks, self.pad_id)

    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams) -> Generation:
        ids, mask = left_pad(prompts, self.pad_id)
        recorder = _RecordTopK(params.record_topk) if params.record_topk > 0 else None
        greedy = params.temperature == 0
        was_training = self.model.training
        self.model.eval()
        with self.autocast():
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.long().to(self.device), max_new_tokens=params.max_new_tokens,
                do_sample=not greedy, temperature=None if greedy else params.temperature,
                top_p=None if greedy else params.top_p, top_k=None if greedy else (params.top_k or None),
                eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id,
                logits_processor=LogitsProcessorList([recorder]) if recorder else None,
            )
        self.model.train(was_training)
        response, response_mask = strip_after_eos(out[:, ids.shape[1]:].cpu(), self.eos_ids, self.pad_id)
        topk = torch.stack(recorder.steps, dim=1).cpu() if recorder else None  # [B, T, k]
        return Generation(response, response_mask, topk)

    def sync_weights(self, named_tensors=None) -> None:
        """Nothing to do: the engine generates with the training module itself."""


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _concat(chunks: list[Generation], pad_id: int) -> Generation:
    width = max(c.response_ids.shape[1] for c in chunks)

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        extra = width - t.shape[1]
        if extra == 0:
            return t
        filler = torch.full((t.shape[0], extra, *t.shape[2:]), value, dtype=t.dtype)
        return torch.cat([t, filler], dim=1)

    ids = torch.cat([pad(c.response_ids, pad_id) for c in chunks])
    mask = torch.cat([pad(c.response_mask, False) for c in chunks])
    topk = None if chunks[0].topk_ids is None else torch.cat([pad(c.topk_ids, 0) for c in chunks])
    return Generation(ids, mask, topk)
