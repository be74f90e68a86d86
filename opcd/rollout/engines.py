"""Which rollout engine a worker builds: the one choice between `hf` and `vllm`, from its spec's
`rollout` section (opcd/workers/spec.py), and the engine's settings derived from the config."""

from __future__ import annotations

from opcd.rollout import RolloutEngine
from opcd.rollout.hf import HFRollout

# vLLM refuses more log-probs per token than its max_logprobs (default 20)
_VLLM_MIN_LOGPROBS = 20


def vllm_settings(spec, device) -> dict:
    """The VLLMRollout keyword arguments of a worker's spec: its context (`spec.max_model_len`), the
    run's seed, the memory settings, room for the policy's top-k log-probs, the engine's tensor-parallel
    size, and eager mode on CPU unless the config says otherwise (CUDA graphs pay only on GPUs)."""
    r = spec.rollout
    on_gpu = device is not None and device.type == "cuda"
    return {"max_model_len": spec.max_model_len, "seed": spec.trainer.seed,
            "gpu_memory_utilization": r.vllm_gpu_memory_utilization, "cpu_kv_cache_gb": r.vllm_cpu_kv_cache_gb,
            "max_logprobs": max(spec.loss.kl_topk, _VLLM_MIN_LOGPROBS),
            "tensor_parallel_size": r.vllm_tensor_parallel_size,
            "enforce_eager": r.vllm_enforce_eager if r.vllm_enforce_eager is not None else not on_gpu}


def make_rollout(spec, model, tokenizer, device, autocast=None) -> RolloutEngine:
    """A worker's generation engine from its spec (opcd.workers.spec.WorkerSpec): `vllm` holds its own
    copy of the weights; `hf` generates with `model` itself, on `device`, under `autocast`."""
    if spec.rollout.backend == "vllm":
        from opcd.rollout.vllm import VLLMRollout  # vLLM is heavy and optional: imported only when used

        return VLLMRollout(spec.model_path, tokenizer, dtype=spec.dtype, trust_remote_code=spec.model.trust_remote_code,
                           local_rank=device.index or 0 if device is not None else 0, **vllm_settings(spec, device))
    return HFRollout(model, tokenizer, device=device, **({"autocast": autocast} if autocast else {}),
                     cache=spec.rollout.hf_cache, compile=spec.rollout.hf_compile)
