"""A memory plan before launch: per GPU, what each part of a training step holds, phase by phase
(generate -> teacher scoring -> update -> weight sync), against the card. `opcd distill --plan`.

Pure arithmetic from the model's shape (opcd/runtime/model_shapes.py) and the resolved settings
(`Layout.from_config`). What the code does and the plan follows (docs/memory-plan.md):
- student: FSDP2 shards of fp32 master weights, fp32 gradients (freed after the optimiser step) and
  AdamW's two fp32 moments, i.e. 4 + 4 + 8 bytes per parameter / student ranks; compute in bf16;
- teacher: FSDP2 shards in the run's dtype, on the same GPUs (colocate) or GPUs of its own (separate);
- vLLM engine: sleeps (level 2: weights and KV cache freed) from the end of generation to the sync;
  awake it claims gpu_memory_utilization x card: weights per TP shard + its activations + KV cache.
Activations, FSDP2 buffers and vLLM's own activations are documented estimates, not measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from opcd.errors import ConfigError
from opcd.runtime.model_shapes import DTYPE_BYTES, ModelShape

GiB = 2**30
PROCESS_OVERHEAD = 1 * GiB  # CUDA context + NCCL buffers of one process (estimate)
KV_BLOCK = 16  # vLLM allocates KV in blocks of 16 tokens
ENGINE_BATCHED_TOKENS = 16384  # vLLM's profiling batch for the offline LLM class on H100-class GPUs
ENGINE_MAX_SEQS = 1024  # ... and its sampler rows at profiling
CUDA_GRAPHS = GiB // 2  # vLLM's captured CUDA graphs when not eager (estimate)


@dataclass(frozen=True)
class Layout:
    """The resolved settings the plan needs (from a DistillConfig: `from_config`)."""

    student_ranks: int
    teacher_ranks: int
    colocated: bool
    gpu: bool
    compute_bytes: int  # model.dtype
    activation_checkpointing: bool
    cpu_offload: bool
    rows: int  # sequences per step: batch_size x n
    prompt_tokens: int  # task.max_prompt_length (longer rows are dropped: an upper bound)
    response_tokens: int
    micro_batch_size: int
    micro_batch_tokens: int
    teacher_micro_batch_tokens: int
    lm_head_chunk: int
    topk: int
    engine: str  # "vllm" | "hf"
    tensor_parallel: int
    gpu_memory_utilization: float
    enforce_eager: bool

    @classmethod
    def from_config(cls, cfg) -> Layout:
        r, t, ray = cfg.rollout, cfg.trainer, cfg.ray
        return cls(student_ranks=ray.ranks_per_group, teacher_ranks=ray.teacher_ranks or ray.ranks_per_group,
                   colocated=ray.placement == "colocate", gpu=ray.gpus_per_node > 0,
                   compute_bytes=DTYPE_BYTES[cfg.model.dtype],
                   activation_checkpointing=bool(cfg.model.activation_checkpointing), cpu_offload=cfg.model.cpu_offload,
                   rows=t.batch_size * r.n, prompt_tokens=cfg.task.max_prompt_length,
                   response_tokens=r.max_response_length, micro_batch_size=t.micro_batch_size,
                   micro_batch_tokens=t.micro_batch_tokens, teacher_micro_batch_tokens=t.teacher_micro_batch_tokens,
                   lm_head_chunk=cfg.loss.lm_head_chunk_size,
                   topk=max(cfg.loss.kl_topk, 0), engine=r.backend,
                   tensor_parallel=r.vllm_tensor_parallel_size if r.backend == "vllm" else 1,
                   gpu_memory_utilization=r.vllm_gpu_memory_utilization,
                   enforce_eager=r.vllm_enforce_eager if r.vllm_enforce_eager is not None else not ray.gpus_per_node)

    @property
    def seq_tokens(self) -> int:
        return self.prompt_tokens + self.response_tokens

    @property
    def micro_tokens(self) -> int:
        """Tokens of the largest micro-batch on one rank (rows padded to the longest)."""
        if self.micro_batch_tokens > 0:  # a row longer than the budget is a micro-batch of its own
            return max(self.micro_batch_tokens, self.seq_tokens)
        per_rank = math.ceil(self.rows / self.student_ranks)
        return min(self.micro_batch_size, per_rank) * self.seq_tokens

    @property
    def teacher_micro_tokens(self) -> int:
        """Tokens of the teacher's largest scoring pass: its own budget when set (WorkerSpec.micro_batching)."""
        if self.teacher_micro_batch_tokens > 0:
            return max(self.teacher_micro_batch_tokens, self.seq_tokens)
        return self.micro_tokens

    @property
    def rows_per_engine(self) -> int:
        return math.ceil(self.rows / (self.student_ranks // self.tensor_parallel))


@dataclass(frozen=True)
class MemoryPlan:
    items: dict[str, int]  # bytes per GPU of each part
    phases: dict[str, int]  # bytes per GPU in each phase (the student's GPU)
    teacher_gpu: int | None  # bytes on a teacher GPU of its own (separate placement)
    kv_needed: int
    kv_available: int
    card: int
    warnings: list[str]

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def headroom(self) -> int:
        return self.card - max(self.phases[self.peak_phase], self.teacher_gpu or 0)


def layer_activation_bytes_per_token(shape: ModelShape, b: int) -> int:
    """What one decoder layer keeps for backward per token: the norm output, q, k, v, the attention
    output, o_proj's output, the residual and the second norm (6 x hidden + 2 x q + 2 x kv), and
    the MLP's gate, up, act(gate), act(gate) * up (4 x intermediate), each in the compute dtype."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return b * (6 * shape.hidden + 2 * q + 2 * kv + 4 * shape.intermediate)


def student_activations(shape: ModelShape, lay: Layout) -> int:
    """The largest micro-batch's activations. Checkpointed: every layer's input (hidden x tokens) plus
    one layer recomputed with its gradients (2 x one layer); else every layer's. Plus the chunked
    head: a chunk's fp32 logits, log-softmax and gradient (or the whole [tokens, vocab] with chunk
    0), the final hidden states and their gradient, and the top-k loss inputs."""
    tokens, b = lay.micro_tokens, lay.compute_bytes
    layer = layer_activation_bytes_per_token(shape, b) * tokens
    body = shape.layers * tokens * shape.hidden * b + 2 * layer if lay.activation_checkpointing else shape.layers * layer
    chunk = lay.lm_head_chunk or tokens
    head = 3 * min(chunk, tokens) * shape.vocab * 4 + 2 * tokens * shape.hidden * b
    return body + head + tokens * lay.topk * (4 + 8) * 2


def teacher_activations(shape: ModelShape, lay: Layout, b: int) -> int:
    """Scoring without gradients: one layer's working set, the residual stream, a head chunk (x2)."""
    tokens = lay.teacher_micro_tokens
    chunk = min(lay.lm_head_chunk or tokens, tokens)
    return layer_activation_bytes_per_token(shape, b) * tokens + tokens * shape.hidden * b + 2 * chunk * shape.vocab * 4


def fsdp_buffers(shape: ModelShape, ranks: int, b: int, training: bool) -> int:
    """FSDP2's gathered parameters: the root (kept gathered from forward to backward) and two layers
    (one prefetched) in the compute dtype; training adds the root's and a layer's unsharded gradients
    in fp32 (the reduce dtype). One rank under autocast: a compute-dtype copy of every weight."""
    if ranks == 1:
        return shape.params * b if training and b < 4 else 0
    gathered = (shape.root_params + 2 * shape.layer_params) * b
    return gathered + ((shape.root_params + shape.layer_params) * 4 if training else 0)


def engine_activations(shape: ModelShape, lay: Layout, b: int) -> int:
    """vLLM's profiling peak (estimate): a batch of ENGINE_BATCHED_TOKENS through one layer's widest
    tensors, the sampler's fp32 logits and probabilities for ENGINE_MAX_SEQS rows, CUDA graphs."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    body = ENGINE_BATCHED_TOKENS * (2 * shape.intermediate + q + 2 * kv + 4 * shape.hidden) * b // lay.tensor_parallel
    return body + ENGINE_MAX_SEQS * shape.vocab * 4 * 2 + (0 if lay.enforce_eager else CUDA_GRAPHS)


def plan(student: ModelShape, teacher: ModelShape, lay: Layout, card: int) -> MemoryPlan:
    """Every part and phase per GPU, the KV cache needed against what the engine gets, and warnings."""
    b, p, n = lay.compute_bytes, student.params, lay.student_ranks
    on_gpu = 0 if lay.cpu_offload and n > 1 else 1  # CPU offload keeps shards, gradients and moments in RAM
    items = {"student weights (fp32 shard)": on_gpu * p * 4 // n, "gradients (fp32 shard)": on_gpu * p * 4 // n,
             "AdamW moments (2 x fp32 shard)": on_gpu * p * 8 // n,
             "student FSDP2 buffers": fsdp_buffers(student, n, b, True),
             "activations (largest micro-batch)": student_activations(student, lay),
             "teacher weights (shard)": teacher.params * b // lay.teacher_ranks,
             "teacher FSDP2 buffers": fsdp_buffers(teacher, lay.teacher_ranks, b, False),
             "teacher scoring activations": teacher_activations(teacher, lay, b)}
    kv_token = student.kv_bytes_per_token(b, lay.tensor_parallel)
    kv_needed = lay.rows_per_engine * math.ceil(lay.seq_tokens / KV_BLOCK) * KV_BLOCK * kv_token
    if lay.engine == "vllm":
        engine = int(lay.gpu_memory_utilization * card)
        items["engine weights (TP shard)"] = p * b // lay.tensor_parallel
        items["engine activations (estimate)"] = engine_activations(student, lay, b)
        kv_available = max(engine - items["engine weights (TP shard)"] - items["engine activations (estimate)"], 0)
        items["engine KV cache (what it gets)"] = kv_available
    else:  # the hf engine generates with the training module: its KV cache is what the batch needs
        engine, kv_available = kv_needed, kv_needed
        items["hf KV cache (rows per rank)"] = kv_needed
    teacher_here = items["teacher weights (shard)"] if lay.colocated else 0
    resident = items["student weights (fp32 shard)"] + items["AdamW moments (2 x fp32 shard)"] + teacher_here
    items["CUDA contexts + NCCL (estimate)"] = lay.gpu * PROCESS_OVERHEAD * (2 if lay.colocated else 1)
    resident += items["CUDA contexts + NCCL (estimate)"]
    scoring = items["teacher FSDP2 buffers"] + items["teacher scoring activations"]
    phases = {"generate": resident + engine,
              "teacher scoring": resident + (scoring if lay.colocated else 0),
              "update": resident + items["gradients (fp32 shard)"] + items["student FSDP2 buffers"]
              + items["activations (largest micro-batch)"],
              # weights awake, one gathered fp32 tensor (the largest: the embedding) in flight
              "weight sync": resident + items.get("engine weights (TP shard)", 0) + student.vocab * student.hidden * 4}
    teacher_gpu = None if lay.colocated else PROCESS_OVERHEAD + items["teacher weights (shard)"] + scoring
    warnings = []
    if kv_needed > kv_available:
        rows = kv_available // max(math.ceil(lay.seq_tokens / KV_BLOCK) * KV_BLOCK * kv_token, 1)
        warnings.append(f"WARNING: the engine's KV cache ({gib(kv_available)}) holds {rows} of its "
                        f"{lay.rows_per_engine} rows at full length ({gib(kv_needed)} needed): vLLM will preempt "
                        f"and recompute; raise rollout.vllm_gpu_memory_utilization or use more GPUs")
    return MemoryPlan(items, phases, teacher_gpu, kv_needed, kv_available, card, warnings)


def check_fits(memory: MemoryPlan) -> None:
    """Refuse in one line when a phase needs more than the card."""
    phase = memory.peak_phase
    need = max(memory.phases[phase], memory.teacher_gpu or 0)
    if need > memory.card:
        where = phase if memory.phases[phase] >= (memory.teacher_gpu or 0) else "teacher GPU"
        raise ConfigError(f"memory plan: the {where} phase needs {gib(need)} per GPU, more than the card's "
                          f"{gib(memory.card)} (--gpu-memory); use more GPUs, a smaller trainer.micro_batch_size "
                          f"or rollout.vllm_gpu_memory_utilization, or model.cpu_offload=true")


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def format_plan(memory: MemoryPlan, header: list[str]) -> str:
    lines = list(header) + ["", "per GPU:"]
    lines += [f"  {name:<36} {gib(value):>12}" for name, value in memory.items.items()]
    lines += ["", f"  KV cache the batch needs per engine GPU: {gib(memory.kv_needed)}; "
                  f"the engine gets {gib(memory.kv_available)}", "", "phases (sum resident on the student's GPU):"]
    lines += [f"  {name:<36} {gib(value):>12}" for name, value in memory.phases.items()]
    if memory.teacher_gpu is not None:
        lines.append(f"  {'teacher GPU (separate placement)':<36} {gib(memory.teacher_gpu):>12}")
    lines += [f"  {'card':<36} {gib(memory.card):>12}",
              f"  {'headroom at the peak (' + memory.peak_phase + ')':<36} {gib(memory.headroom):>12}"]
    return "\n".join(lines + memory.warnings)
