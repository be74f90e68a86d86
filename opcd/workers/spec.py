"""What a model worker is given: the config's own sections (opcd/config/schema.py), resolved for the
machine, plus the few things that differ per worker (which model, its vocabulary rows, its engine's
context, the student's objective). A new worker setting is one field in the schema, read where it is
used; its bounds and choices are checked there, once, when the config is loaded.

    spec.model    dtype, trust_remote_code, attn_implementation, cpu_offload, activation_checkpointing
    spec.rollout  the generation engine (backend, hf_*/vllm_*) and the temperature log-probs use
    spec.trainer  threads, micro-batching, optimiser (lr, weight_decay, grad_clip)
    spec.loss     objective, support mode, aggregation, lm_head chunking

The pipelines build specs with `WorkerSpec.from_config`; tests and benchmarks with `WorkerSpec.build`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from opcd.config.load import build_section
from opcd.config.schema import DistillConfig, LossConfig, ModelConfig, RolloutConfig, TrainerConfig
from opcd.errors import require
from opcd.loss.objective import OBJECTIVES, Objective

_SECTIONS = {"model": ModelConfig, "rollout": RolloutConfig, "trainer": TrainerConfig, "loss": LossConfig}


@dataclass(frozen=True)
class WorkerSpec:
    model_path: str
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    vocab_rows: int | None = None  # score over the first rows only (a teacher padded beyond the student's ids)
    max_model_len: int | None = None  # the vLLM engine's context (None: the model's own limit)
    objective: Objective | None = None  # the student's loss, when not loss.kl_loss_type (off-policy)

    def __post_init__(self):
        require(bool(self.model_path), "WorkerSpec.model_path", self.model_path, "a model folder or hub id")
        # the machine-dependent values are decided by opcd.config.resolve before a spec is made
        require(self.model.dtype != "auto", "WorkerSpec.model.dtype", self.model.dtype,
                "a resolved dtype (float32, bfloat16 or float16): resolve the config first")
        require(self.rollout.backend != "auto", "WorkerSpec.rollout.backend", self.rollout.backend,
                "a resolved backend (hf or vllm): resolve the config first")
        require(self.objective is None or self.objective in OBJECTIVES, "WorkerSpec.objective", self.objective,
                f"None or one of {', '.join(OBJECTIVES)}")
        require(self.vocab_rows is None or self.vocab_rows >= 1, "WorkerSpec.vocab_rows", self.vocab_rows,
                "None or an integer >= 1")

    @classmethod
    def from_config(cls, cfg: DistillConfig, model_path: str, *, vocab_rows: int | None = None,
                    max_model_len: int | None = None, objective: Objective | None = None) -> WorkerSpec:
        """The spec of a worker holding the model at `model_path`, sharing the (resolved) config's sections."""
        return cls(model_path, cfg.model, cfg.rollout, cfg.trainer, cfg.loss, vocab_rows=vocab_rows,
                   max_model_len=max_model_len, objective=objective)

    @classmethod
    def build(cls, model_path: str, *, vocab_rows: int | None = None, max_model_len: int | None = None,
              objective: Objective | None = None, **settings) -> WorkerSpec:
        """A spec from config keys written without their section (`micro_batch_size=2`, `backend="vllm"`,
        `lr=1e-3`): each goes to the one section that declares it, checked by that section; the rest keep
        the config's defaults, resolved for one CPU process (float32, the hf engine, no activation
        checkpointing)."""
        local = cls(model_path, ModelConfig(dtype="float32", activation_checkpointing=False),
                    RolloutConfig(backend="hf"))
        return local.replace(vocab_rows=vocab_rows, max_model_len=max_model_len, objective=objective, **settings)

    def replace(self, **settings) -> WorkerSpec:
        """This spec with some keys changed: its own fields, or section keys as in `build`."""
        sections = {name: dict(dataclasses.asdict(getattr(self, name))) for name in _SECTIONS}
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _SECTIONS}
        for key, value in settings.items():
            if key in own:
                own[key] = value
                continue
            owners = [name for name, section in _SECTIONS.items() if key in section.__dataclass_fields__]
            require(len(owners) == 1, "WorkerSpec setting", key,
                    f"a key of one of the config sections {', '.join(_SECTIONS)}")
            sections[owners[0]][key] = value
        return type(self)(**own, **{name: build_section(_SECTIONS[name], kw, name) for name, kw in sections.items()})

    @property
    def dtype(self) -> str:
        return self.model.dtype

    @property
    def kl_loss_type(self) -> Objective:
        return self.objective or self.loss.kl_loss_type

    def micro_batching(self, scoring_only: bool) -> tuple[int, int]:
        """(sequences, token budget) per forward pass. A no-grad scoring pass (the teacher) holds no
        activations for a backward, so it takes trainer.teacher_micro_batch_tokens when set."""
        t = self.trainer
        if scoring_only and t.teacher_micro_batch_tokens > 0:
            return t.micro_batch_size, t.teacher_micro_batch_tokens
        return t.micro_batch_size, t.micro_batch_tokens
