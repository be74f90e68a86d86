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

Sampling draws each prompt's tokens from its own random stream (`opcd.rollout.prompt_seed`), by
counter-based draws on the device in a logits processor (opcd/rollout/draws.py: one hashed uniform per
row and position, inverted through the row's CDF), so a
prompt's response does not depend on the other prompts of the batch, nor on how the batch is split
over ranks. With several FSDP ranks (the model is
sharded: every forward is a collective) each rank generates its own prompts; the ranks run the same
number of `generate` calls, and `synced_gpus` keeps their decoding steps in step.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import CompileConfig, LogitsProcessor, LogitsProcessorList, StaticCache

from opcd.data.batching import left_pad, strip_after_eos
from opcd.protocol import Generation, SamplingParams
from opcd.rollout import concat_generations, prompt_seed
from opcd.rollout.draws import inverse_cdf_sample

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


class _SeededSampler(LogitsProcessor):
    """Samples every row from its own counter-based stream (opcd/rollout/draws.py: noise keyed by the
    prompt's seed and the decoding position), after temperature, top-k and top-p as transformers
    applies them, and leaves only the chosen token finite, so greedy decoding picks it."""

    def __init__(self, seeds: list[int], params: SamplingParams, prompt_width: int):
        # two's-complement int64 view of the 64-bit seeds: the hash reads their bits
        self.seeds = torch.tensor([_as_int64(seed) for seed in seeds], dtype=torch.int64)
        self.params = params
        self.prompt_width = prompt_width  # the left-padded prompts' width: positions count from there

    def __call__(self, input_ids, scores):  # scores [B, V], raw logits
        position = input_ids.shape[1] - self.prompt_width
        if self.seeds.device != scores.device:  # once per call: then every step stays on the device
            self.seeds = self.seeds.to(scores.device)
        token = inverse_cdf_sample(warp(scores.float(), self.params), self.seeds, position)
        return torch.full_like(scores, -float("inf")).scatter_(-1, token.unsqueeze(-1), 0.0)


def _as_int64(seed: int) -> int:
    bits = seed % 2**64
    return bits - 2**64 if bits >= 2**63 else bits


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
    # Generates with the training module itself: no sync, and nothing to put to sleep (a static cache
    # stays allocated on purpose, its captured CUDA graphs read its addresses).
    shares_module = True

    def __init__(self, model, tokenizer, batch_size: int = 64, autocast=contextlib.nullcontext,
                 cache: str | None = "dynamic", compile: bool | None = False,
                 device: torch.device | str | None = None):
        self.model = model
        # where the inputs go: the worker's compute device (FSDP2 with CPU offload keeps parameters on
        # CPU and computes on the GPU), else where the model's parameters are
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.autocast = autocast  # the student's fp32 master weights generate in its compute dtype on GPU
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
        self.batch_size = batch_size  # prompts per generate call: bounds the KV cache
        sharded = any(isinstance(p, DTensor) for p in model.parameters())
        self.cache, self.compile = resolve_cache(cache, compile, self.device, sharded)
        # one instance: transformers recompiles when the config object compares unequal to the last one
        self.compile_config = CompileConfig(fullgraph=False, mode="reduce-overhead")
        self.compile_config._compile_all_devices = True  # honour an explicit compile on CPU too (tests)
        self._static: StaticCache | None = None
        self._static_shape = (0, 0)  # (rows, slots) of the kept static cache

    def sync_weights(self, named_tensors=None) -> None:
        """Nothing to load: the engine generates with the training module."""

    def sleep(self) -> None:
        """Nothing to free (see `shares_module`)."""

    def wake_weights(self) -> None:
        """Nothing to allocate."""

    def wake_cache(self) -> None:
        """Nothing to allocate."""

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> Generation:
        """Prompt i samples with `prompt_seed(seed, i)`: a resumed run samples the same tokens."""
        starts = list(range(0, len(prompts), self.batch_size))
        calls = _same_on_every_rank(len(starts), self.device)
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
        rows = len(prompts)
        if self.compile:  # a few compiled batch shapes: pad with copies of the first prompt
            prompts = prompts + [prompts[0]] * (_batch_bucket(rows, self.batch_size) - rows)
        ids, mask = left_pad(prompts, self.pad_id)
        recorder = _RecordTopK(params.record_topk) if params.record_topk > 0 else None
        greedy = params.temperature == 0
        processors = [recorder] if recorder else []
        if not greedy:  # after the recorder: it records the raw distribution
            processors.append(_SeededSampler([prompt_seed(seed, first + i) for i in range(len(prompts))], params,
                                             ids.shape[1]))
        was_training = self.model.training
        self.model.eval()
        with self.autocast():
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.long().to(self.device),
                max_new_tokens=params.max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id,
                logits_processor=LogitsProcessorList(processors) if processors else None,
                synced_gpus=_distributed(),
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


def _batch_bucket(rows: int, cap: int) -> int:
    """The smallest power of two >= rows, at most `cap` (the chunk size, itself a compiled shape)."""
    return min(1 << (rows - 1).bit_length(), max(cap, rows))


def _distributed() -> bool:
    """A worker with a process group holds an FSDP-sharded model: its forwards are collectives."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _same_on_every_rank(calls: int, device: torch.device) -> int:
    """The most `generate` calls any rank makes (each rank's own count without a process group)."""
    if not _distributed():
        return calls
    count = torch.tensor([calls], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
