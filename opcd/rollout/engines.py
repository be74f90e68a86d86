"""Which rollout engine a worker builds: the one choice between `hf` and `vllm`, from its spec."""

from __future__ import annotations

from opcd.rollout import RolloutEngine
from opcd.rollout.hf import HFRollout


def make_rollout(spec, model, tokenizer, device, autocast=None) -> RolloutEngine:
    """A worker's generation engine from its spec (opcd.workers.spec.WorkerSpec): `vllm` holds its own
    copy of the weights; `hf` generates with `model` itself, on `device`, under `autocast`."""
    if spec.rollout_backend == "vllm":
        from opcd.rollout.vllm import VLLMRollout  # vLLM is heavy and optional: imported only when used

        return VLLMRollout(spec.model_path, tokenizer, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code,
                           local_rank=device.index or 0 if device is not None else 0, **spec.vllm)
    return HFRollout(model, tokenizer, device=device, **({"autocast": autocast} if autocast else {}), **spec.hf)
