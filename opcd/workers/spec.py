"""What a model worker is given: one typed, validated spec per concern instead of two dozen keyword
arguments. The pipelines build them from the config (`worker_spec`, `train_spec` in
opcd/pipelines/run_setup.py); tests build them directly. A bad value fails here, in the driver, with
one line naming the field.

    WorkerSpec  every worker holding a model (the student and every frozen model): the model, how its
                log-probs are computed (opcd/workers/scoring.py) and its generation engine
    TrainSpec   the student only: optimiser and loss
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, get_args, get_type_hints

from opcd.errors import require
from opcd.loss.kl import Aggregation, SupportMode
from opcd.loss.objective import Objective

DTYPES = ("float32", "bfloat16", "float16")


def _check(ok: bool, spec: str, name: str, value, expected: str) -> None:
    require(ok, f"{spec}.{name}", value, expected)


def _check_choices(spec) -> None:
    """Every Literal field of `spec` holds one of its choices (the choices are written once, in the type)."""
    hints = get_type_hints(type(spec))
    for f in fields(spec):
        choices = get_args(hints[f.name]) if getattr(hints[f.name], "__origin__", None) is Literal else ()
        if choices:
            value = getattr(spec, f.name)
            _check(value in choices, type(spec).__name__, f.name, value, f"one of {', '.join(choices)}")


@dataclass(frozen=True)
class WorkerSpec:
    model_path: str
    dtype: Literal[DTYPES] = "float32"  # compute dtype (fp32 master weights on GPU)
    trust_remote_code: bool = False
    attn_implementation: str | None = None  # None = transformers' choice
    cpu_offload: bool = False  # several ranks: parameters (and the student's optimiser state) live on CPU
    num_threads: int = 0  # torch threads; 0 = all cores
    temperature: float = 1.0  # log-probs are of softmax(logits / temperature)
    micro_batch_size: int = 8  # sequences per forward pass
    micro_batch_tokens: int = 0  # > 0: micro-batches by this token budget instead
    lm_head_chunk_size: int = 512  # > 0: the lm_head a chunk of tokens at a time (no [tokens, vocab] logits)
    padding_free: bool | None = None  # packed rows on the chunked path; None = where it pays (flash-attention)
    vocab_rows: int | None = None  # score over the first rows only (a teacher padded beyond the student's ids)
    rollout_backend: Literal["hf", "vllm"] = "hf"  # the generation engine
    vllm: dict = field(default_factory=dict)  # VLLMRollout keyword arguments (backend vllm)
    hf: dict = field(default_factory=dict)  # HFRollout keyword arguments (KV cache, compile)

    def __post_init__(self):
        _check(bool(self.model_path), "WorkerSpec", "model_path", self.model_path, "a model folder or hub id")
        _check(self.num_threads >= 0, "WorkerSpec", "num_threads", self.num_threads, "an integer >= 0")
        _check(self.temperature > 0, "WorkerSpec", "temperature", self.temperature, "a float > 0")
        _check(self.micro_batch_size >= 1, "WorkerSpec", "micro_batch_size", self.micro_batch_size, "an integer >= 1")
        _check(self.micro_batch_tokens >= 0, "WorkerSpec", "micro_batch_tokens", self.micro_batch_tokens,
               "an integer >= 0")
        _check(self.lm_head_chunk_size >= 0, "WorkerSpec", "lm_head_chunk_size", self.lm_head_chunk_size,
               "an integer >= 0 (0 = full logits)")
        _check(self.vocab_rows is None or self.vocab_rows >= 1, "WorkerSpec", "vocab_rows", self.vocab_rows,
               "None or an integer >= 1")
        _check_choices(self)


@dataclass(frozen=True)
class TrainSpec:
    lr: float = 1e-6  # constant, AdamW
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # gradient-norm clipping
    kl_loss_type: Objective = "full"  # opcd.loss.objective
    support_mode: SupportMode = "tail"
    aggregation: Aggregation = "token_mean"
    activation_checkpointing: bool = False

    def __post_init__(self):
        _check(self.lr > 0, "TrainSpec", "lr", self.lr, "a float > 0")
        _check(self.weight_decay >= 0, "TrainSpec", "weight_decay", self.weight_decay, "a float >= 0")
        _check(self.grad_clip > 0, "TrainSpec", "grad_clip", self.grad_clip, "a float > 0")
        _check_choices(self)
