"""A training run's set-up on the driver: the models' paths and limits, the teacher's compatibility
with the student, the context and the domain (opcd/pipelines/domain_setup.py), all checked before Ray
starts or any worker loads a model; and the sampling settings every pipeline rolls out with. The
worker groups come from opcd/pipelines/worker_setup.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from opcd.config import DistillConfig, LossConfig, RolloutConfig, check_model_limits
from opcd.data.contexts import ContextSource
from opcd.domains import Domain
from opcd.domains.sources import RolloutSource
from opcd.models import (check_same_tokenizer, check_teacher_covers_student, load_model_config, load_tokenizer,
                         resolve_model, vocab_rows)
from opcd.pipelines.domain_setup import load_run_context, make_domain
from opcd.protocol import SamplingParams


def rollout_sampling(rollout: RolloutConfig, loss: LossConfig) -> SamplingParams:
    """How the student samples its training rollouts; the full-vocabulary top-k loss also records the
    policy's own top-k ids at every position (its support)."""
    record = loss.kl_topk if loss.kl_loss_type == "full" and loss.kl_topk > 0 else 0
    return SamplingParams(rollout.temperature, rollout.top_p, rollout.top_k, rollout.max_response_length,
                          record_topk=record)


def eval_sampling(rollout: RolloutConfig) -> SamplingParams:
    """How every held-out evaluation samples (rollout.eval_*)."""
    return SamplingParams(rollout.eval_temperature, rollout.eval_top_p, rollout.eval_top_k, rollout.max_response_length)


@dataclass
class Prepared:
    """Everything checked and built on the driver before any worker starts."""

    student_path: str
    teacher_path: str
    tokenizer: object
    context: ContextSource
    domain: Domain  # what the run learns from and is evaluated on
    source: RolloutSource  # the domain's training source
    student_vocab_rows: int | None = None  # set when the teacher's embedding has more rows (it scores over these)


def prepare(cfg: DistillConfig) -> Prepared:
    student_path = resolve_model(cfg.model.path)
    teacher_path = resolve_model(cfg.model.teacher_path) if cfg.model.teacher_path else student_path
    student_config = load_model_config(student_path, cfg.model.trust_remote_code)
    positions = check_model_limits(cfg, student_config, student_path)
    tokenizer = load_tokenizer(student_path, cfg.model.trust_remote_code)
    rows = None
    if teacher_path != student_path:
        rows = _check_teacher(cfg.model.trust_remote_code, tokenizer, student_config, student_path, teacher_path)
    context = load_run_context(cfg.task, tokenizer)
    domain = make_domain(cfg, tokenizer, context, "train", positions)
    return Prepared(student_path, teacher_path, tokenizer, context, domain, domain.training_source(), rows)


def _check_teacher(trust_remote_code: bool, student_tok, student_config, student_path: str,
                   teacher_path: str) -> int | None:
    """Same tokenizer, and a teacher embedding that covers the student's ids; -> the student's row
    count when the teacher has more rows (it then scores over those), else None."""
    teacher_tok = load_tokenizer(teacher_path, trust_remote_code)
    check_same_tokenizer(student_tok, teacher_tok, student_path, teacher_path)
    teacher_config = load_model_config(teacher_path, trust_remote_code)
    check_teacher_covers_student(student_config, teacher_config, student_path, teacher_path)
    student_rows = vocab_rows(student_config)
    return student_rows if vocab_rows(teacher_config) > student_rows else None
