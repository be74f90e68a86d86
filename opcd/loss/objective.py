"""Which per-token loss a configuration asks for: a thin, pure switch over `opcd.loss.kl`.

`full` is the top-k (or full-vocabulary) reverse KL over the support; k1/k2/k3/abs are the
sampled-token estimators, whose "support" is the sampled token itself (K = 1). Off-policy only
(`offpolicy.objective`, the same names): `forward_kl` (forward KL over the teacher's top-k) and
`seqkd` (NLL of the teacher's tokens).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from opcd.loss import kl

# The names, once: the config's choices (loss.kl_loss_type, offpolicy.objective) and the student's.
KLLossType = Literal["full", kl.SampledEstimator]
OffPolicyObjective = Literal["forward_kl", "seqkd"]
Objective = Literal[KLLossType, OffPolicyObjective]
OBJECTIVES = get_args(Objective)


def uses_sampled_token(kl_loss_type: str) -> bool:
    return kl_loss_type in (*get_args(kl.SampledEstimator), "seqkd")


def per_token_loss(kl_loss_type: str, support_mode: str, student_logprobs: torch.Tensor,
                   teacher_logprobs: torch.Tensor, support_mask: torch.Tensor | None) -> torch.Tensor:
    """student/teacher log-probs [B, T, K] at the support -> per-token loss [B, T]."""
    match kl_loss_type:
        case "full":
            return kl.support_reverse_kl(student_logprobs, teacher_logprobs, support_mode, support_mask)
        case "k1" | "k2" | "k3" | "abs":
            return kl.sampled_kl(student_logprobs[..., 0], teacher_logprobs[..., 0], kl_loss_type)
        case "forward_kl":  # off-policy: KL(teacher || student) over the teacher's top-k
            return kl.support_forward_kl(student_logprobs, teacher_logprobs, support_mode, support_mask)
        case "seqkd":
            return kl.nll(student_logprobs[..., 0])
        case _:
            raise ValueError(f"unknown kl_loss_type {kl_loss_type!r}")
