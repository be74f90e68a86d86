"""The `hf` rollout engine: transformers `generate` over a left-padded batch with a KV cache.

It samples from the very module the student trains (no copy, no sync), so every rollout uses the
current weights. The policy's top-k ids are recorded during generation by a logits processor that
sees the raw logits before temperature/top-p/top-k, which saves the separate student forward pass
the reference spends on them (top-k ids do not depend on the temperature).

Two KV caches (`rollout.hf_cache`), both through `generate` itself, so sampling, EOS handling and the
recorded top-k are the same code:
  dynamic  transformers' default: the cache grows by concatenation, every decoding step launches its
           kernels one by one from Python (the CPU default; on a GPU the launches, not the math,
           set the pace of small-batch decoding).
  static   a preallocated cache of `max_cache_len` slots. With `compile` (`rollout.hf_compile`, the GPU
           default) `generate` runs each decoding step through `torch.compile(mode="reduce-overhead")`,
           i.e. one CUDA-graph replay per token. The prefill stays eager. To keep the compiled shapes
           few, the cache length is rounded up to a multiple of CACHE_LEN_STEP (and never shrinks) and,
           when compiling, the batch is padded to a power of two with copies of its first prompt (dropped
           afterwards). The cache is kept between calls and zeroed in place (its memory stays allocated
           through the update): its tensors keep their addresses, which the captured CUDA graphs read, so
           a later call replays the graphs instead of recording them again.
The first call at a new shape pays the compile and the graph capture (README, "GPU rollout").
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.tensor import DTensor
from transformers import CompileConfig, LogitsProcessor, LogitsProcessorList, StaticCache

from opcd.batching import left_pad, strip_after_eos
from opcd.models import compute_device
from opcd.protocol import Generation, SamplingParams

CACHE_LEN_STEP = 256  # static cache slots are rounded up to this: one compiled shape per 256 tokens of length


class _RecordTopK(LogitsProcessor):
    def __init__(self, k: int):
        self.k = k
        self.steps: list[torch.Tensor] = []  # each [B, k]

    def __call__(self, input_ids, scores):
        self.steps.append(scores.topk(self.k, dim=-1).indices)
        return scores


def resolve_cache(cache: str | None, compile: bool | None, device: torch.device,
                  sharded: bool = False) -> tuple[str, bool]:
    """None picks the fast path on a GPU (static cache, compiled) and today's path on CPU (dynamic, eager).
    An FSDP2-sharded policy is not compiled by default: its forward all-gathers parameters on the way."""
    on_gpu = device.type == "cuda"
    cache = cache or ("static" if on_gpu else "dynamic")
    compile = (on_gpu and cache == "static" and not sharded) if compile is None else compile
    if compile and cache != "static":
        raise ValueError(f"rollout.hf_compile=true needs rollout.hf_cache=static (got {cache!r})")
    return cache, compile


class HFRollout:
    def __init__(self, model, tokenizer, batch_size: int = 64, autocast=contextlib.nullcontext,
                 cache: str | None = "dynamic", compile: bool | None = False):
        self.model = model
        self.autocast = autocast  # the student's fp32 master weights generate in its compute dtype on GPU
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
        self.batch_size = batch_size  # prompts per generate call: bounds the KV cache
        sharded = any(isinstance(p, DTensor) for p in model.parameters())
        self.cache, self.compile = resolve_cache(cache, compile, model.device, sharded)
        # one instance: transformers recompiles when the config object compares unequal to the last one
        self.compile_config = CompileConfig(fullgraph=False, mode="reduce-overhead")
        self.compile_config._compile_all_devices = True  # honour an explicit compile on CPU too (tests)
        self._static: StaticCache | None = None
        self._static_shape = (0, 0)  # (rows, slots) of the kept static cache

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> Generation:
        torch.manual_seed(seed)  # one seed per call: a resumed run samples the same tokens
        chunks = [self._generate_chunk(prompts[i:i + self.batch_size], params)
                  for i in range(0, len(prompts), self.batch_size)]
        return _concat(chunks, self.pad_id)

    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams) -> Generation:
        rows = len(prompts)
        if self.compile:  # a few compiled batch shapes: pad with copies of the first prompt
            prompts = prompts + [prompts[0]] * (_batch_bucket(rows, self.batch_size) - rows)
        ids, mask = left_pad(prompts, self.pad_id)
        device = compute_device()
        recorder = _RecordTopK(params.record_topk) if params.record_topk > 0 else None
        greedy = params.temperature == 0
        was_training = self.model.training
        self.model.eval()
        with self.autocast():
            out = self.model.generate(
                input_ids=ids.to(device), attention_mask=mask.long().to(device), max_new_tokens=params.max_new_tokens,
                do_sample=not greedy, temperature=None if greedy else params.temperature,
                top_p=None if greedy else params.top_p, top_k=None if greedy else (params.top_k or None),
                eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id,
                logits_processor=LogitsProcessorList([recorder]) if recorder else None,
                **self._cache_kwargs(ids.shape[0], ids.shape[1] + params.max_new_tokens),
            )
        self.model.train(was_training)
        new = out[:rows, ids.shape[1]:].cpu()
        response, response_mask = strip_after_eos(new, self.eos_ids, self.pad_id)
        # [B, T, k]; cut to T: a generate that checks stopping a step late would record one step more
        topk = torch.stack(recorder.steps, dim=1)[:rows, :new.shape[1]].cpu() if recorder else None
        return Generation(response, response_mask, topk)

    def _cache_kwargs(self, rows: int, length: int) -> dict:
        if self.cache == "dynamic":
            return {}
        slots = max(-(-length // CACHE_LEN_STEP) * CACHE_LEN_STEP, self._static_shape[1])
        if self._static is None or (rows, slots) != self._static_shape:
            self._static = StaticCache(config=self.model.config.get_text_config(decoder=True), max_cache_len=slots)
            self._static_shape = (rows, slots)
        else:
            self._static.reset()
        # transformers compiles a static cache's decoding on its own on a GPU: say explicitly which we want
        return {"cache": self._static, **({"compile_config": self.compile_config} if self.compile
                                          else {"disable_compile": True})}

    def sync_weights(self, named_tensors=None) -> None:
        """Nothing to do: the engine generates with the training module itself."""


def _batch_bucket(rows: int, cap: int) -> int:
    """The smallest power of two >= rows, at most `cap` (the chunk size, itself a compiled shape)."""
    return min(1 << (rows - 1).bit_length(), max(cap, rows))


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
