"""The `hf` rollout engine: transformers `generate` over a left-padded batch with a KV cache.

It samples from the very module the student trains (no copy, no sync), so every rollout uses the
current weights. The policy's top-k ids are recorded during generation by a logits processor that
sees the raw logits before temperature/top-p/top-k, which saves the separate student forward pass
the reference spends on them (top-k ids do not depend on the temperature).

Sampling draws each prompt's tokens from its own random stream (`opcd.rollout.prompt_seed`), by
inverse-CDF sampling in a logits processor, so a prompt's response does not depend on the other
prompts of the batch, nor on how the batch is split over ranks. With several FSDP ranks (the model is
sharded: every forward is a collective) each rank generates its own prompts; the ranks run the same
number of `generate` calls, and `synced_gpus` keeps their decoding steps in step.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from transformers import LogitsProcessor, LogitsProcessorList

from opcd.batching import left_pad, strip_after_eos
from opcd.models import compute_device
from opcd.protocol import Generation, SamplingParams
from opcd.rollout import concat_generations, prompt_seed


class _RecordTopK(LogitsProcessor):
    def __init__(self, k: int):
        self.k = k
        self.steps: list[torch.Tensor] = []  # each [B, k]

    def __call__(self, input_ids, scores):
        self.steps.append(scores.topk(self.k, dim=-1).indices)
        return scores


class _SeededSampler(LogitsProcessor):
    """Samples every row from its own generator (temperature, then top-k, then top-p, as transformers
    does) and leaves only the chosen token finite, so greedy decoding picks it."""

    def __init__(self, seeds: list[int], params: SamplingParams):
        self.generators = [torch.Generator().manual_seed(seed % 2**63) for seed in seeds]
        self.params = params

    def __call__(self, input_ids, scores):  # scores [B, V], raw logits
        probs = torch.softmax(warp(scores.float(), self.params), dim=-1).double()
        cdf = probs.cumsum(-1)
        cdf = cdf / cdf[:, -1:]
        draws = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        token = torch.searchsorted(cdf, draws.to(cdf.device).unsqueeze(-1), right=True).clamp(max=cdf.shape[-1] - 1)
        return torch.full_like(scores, -float("inf")).scatter_(-1, token, 0.0)


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[B, V] logits -> logits / temperature with tokens outside top-k and top-p set to -inf."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if params.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # mass of the better tokens
        drop = before >= params.top_p
        drop[:, 0] = False  # the best token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return logits


class HFRollout:
    def __init__(self, model, tokenizer, batch_size: int = 64, autocast=contextlib.nullcontext):
        self.model = model
        self.autocast = autocast  # the student's fp32 master weights generate in its compute dtype on GPU
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
        self.batch_size = batch_size  # prompts per generate call: bounds the KV cache

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> Generation:
        """Prompt i samples with `prompt_seed(seed, i)`: a resumed run samples the same tokens."""
        starts = list(range(0, len(prompts), self.batch_size))
        calls = _same_on_every_rank(len(starts))
        chunks = []
        for index in range(calls):
            if index < len(starts):
                start = starts[index]
                chunks.append(self._generate_chunk(prompts[start:start + self.batch_size], params, seed, start))
            else:  # this rank has fewer prompts than another: a throw-away call keeps the collectives matched
                self._generate_chunk(prompts[:1] or [[self.pad_id]], params, seed, 0)
        if not chunks:
            width = (0, 0, params.record_topk) if params.record_topk else None
            return Generation(torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.bool),
                              torch.zeros(width, dtype=torch.long) if width else None)
        return concat_generations(chunks, self.pad_id)

    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams, seed: int, first: int) -> Generation:
        ids, mask = left_pad(prompts, self.pad_id)
        device = compute_device()
        recorder = _RecordTopK(params.record_topk) if params.record_topk > 0 else None
        greedy = params.temperature == 0
        processors = [recorder] if recorder else []
        if not greedy:  # after the recorder: it records the raw distribution
            processors.append(_SeededSampler([prompt_seed(seed, first + i) for i in range(len(prompts))], params))
        was_training = self.model.training
        self.model.eval()
        with self.autocast():
            out = self.model.generate(
                input_ids=ids.to(device), attention_mask=mask.long().to(device), max_new_tokens=params.max_new_tokens,
                do_sample=False, temperature=None, top_p=None, top_k=None,
                eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id,
                logits_processor=LogitsProcessorList(processors) if processors else None,
                synced_gpus=_distributed(),
            )
        self.model.train(was_training)
        response, response_mask = strip_after_eos(out[:, ids.shape[1]:].cpu(), self.eos_ids, self.pad_id)
        topk = torch.stack(recorder.steps, dim=1).cpu() if recorder else None  # [B, T, k]
        return Generation(response, response_mask, topk)

    def sync_weights(self, named_tensors=None) -> None:
        """Nothing to do: the engine generates with the training module itself."""


def _distributed() -> bool:
    """A worker with a process group holds an FSDP-sharded model: its forwards are collectives."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _same_on_every_rank(calls: int) -> int:
    """The most `generate` calls any rank makes (each rank's own count without a process group)."""
    if not _distributed():
        return calls
    count = torch.tensor([calls], device=compute_device())
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
