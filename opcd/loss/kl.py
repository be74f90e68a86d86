"""Distillation losses for on-policy context distillation (OPCD).

Everything here is a pure tensor function: tensors in, tensors out, no
configuration objects, logging, collective calls or I/O.

Setting
-------
At every response position the student (prompt without the context) and the
teacher (same prompt with the context) each define a distribution over the
full vocabulary of size ``V``::

    p_s = softmax(student_logits / T)      p_t = softmax(teacher_logits / T)

Evaluating the exact KL needs both ``[..., V]`` distributions, so the losses
below work on a *support* ``S``: ``K`` token ids per position (typically the
student's top-k, optionally merged with the teacher's top-k).  The callers
gather the log-probabilities of both models at those ids with
:func:`gather_logprobs` and pass two ``[..., K]`` tensors.  The memory-lean
variant that starts from hidden states and applies the lm_head a chunk of tokens
at a time is in `opcd.loss.chunked`.

Support modes (reverse KL; the forward KL swaps the roles of ``p_s``/``p_t``)
------------------------------------------------------------------------------
``partial``
    ``sum_{v in S} p_s(v) * (log p_s(v) - log p_t(v))``.  The terms of the
    exact reverse KL restricted to ``S``.  Equal to the exact KL when ``S`` is
    the whole vocabulary, but on a strict subset it is *not* a divergence: it
    can be negative, and a student can make it smaller simply by moving
    probability mass to tokens outside ``S``.
``renorm``
    ``KL(q_s || q_t)`` with ``q(v) = p(v) / sum_{u in S} p(u)`` for ``v`` in
    ``S``: both distributions renormalised inside the support.  A proper
    divergence (>= 0), but blind to how much mass each model puts outside ``S``.
``tail``
    ``S`` plus one extra bucket per side holding the mass outside the support,
    ``p(tail) = 1 - sum_{v in S} p(v)``, and the exact KL between these two
    ``(K+1)``-bucket distributions::

        sum_{v in S} p_s(v) log(p_s(v)/p_t(v)) + p_s(tail) log(p_s(tail)/p_t(tail))

    Being the KL of a coarse-graining of ``p_s`` and ``p_t`` it is >= 0 and
    never exceeds the exact KL; it equals the exact KL when ``S`` is the whole
    vocabulary (the tail bucket is then empty and contributes ~0).

Departure from the reference implementation
-------------------------------------------
The paper's reference code uses the non-renormalised ``partial`` sum by
default.  We keep it as the default for parity, but recommend ``tail``: it
costs one extra bucket per position and removes the failure mode above
(pushing mass outside ``S`` now raises the tail term instead of lowering the
loss).  ``log(1 - mass)`` is computed stably: the log of the inside mass is
clamped to ``<= -eps`` (``eps`` = 1e-12 for float64, 1e-6 for float32, 1e-3
for 16-bit floats) and fed to a two-branch ``log(1 - exp(x))``, so a support
that holds (numerically) all of the mass gives finite values and gradients
instead of ``-inf``/NaN.

Inputs are expected to be finite log-probabilities.  Losses are computed in
the input dtype; pass float32 (or float64) rather than 16-bit tensors.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

SupportMode = Literal["partial", "renorm", "tail"]
Aggregation = Literal["token_mean", "seq_mean"]
SampledEstimator = Literal["k1", "k2", "k3", "abs"]

_SUPPORT_MODES = get_args(SupportMode)
_AGGREGATIONS = get_args(Aggregation)
_ESTIMATORS = get_args(SampledEstimator)

# Log-ratio clamp of the k3 estimator: exp(20) ~ 4.9e8, far from overflow.
_K3_CLAMP = 20.0


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def _check_pair(student: Tensor, teacher: Tensor) -> None:
    """Student and teacher log-prob tensors must have identical shapes."""
    if student.dim() == 0 or teacher.dim() == 0:
        raise ValueError("support log-probs must have a trailing support dimension [..., K]")
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"support size mismatch: student K={student.shape[-1]}, teacher K={teacher.shape[-1]}"
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"shape mismatch: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}"
        )
    if student.shape[-1] == 0:
        raise ValueError("support is empty (K=0)")


def _resolve_mask(logprobs: Tensor, support_mask: Tensor | None) -> Tensor:
    """Return a bool mask shaped like ``logprobs`` (all True when None)."""
    if support_mask is None:
        return torch.ones_like(logprobs, dtype=torch.bool)
    if support_mask.shape != logprobs.shape:
        raise ValueError(
            f"support_mask shape {tuple(support_mask.shape)} does not match "
            f"log-probs shape {tuple(logprobs.shape)}"
        )
    return support_mask.bool()


def _masked_logsumexp(logprobs: Tensor, mask: Tensor) -> Tensor:
    """``log sum_{k: mask} exp(logprobs[..., k])``; ``[..., K] -> [...]``.

    Excluded slots are filled with the most negative finite value rather than
    ``-inf`` so a fully masked row stays finite (and so do its gradients).
    """
    fill = torch.finfo(logprobs.dtype).min
    return torch.logsumexp(logprobs.masked_fill(~mask, fill), dim=-1)


def _tail_eps(dtype: torch.dtype) -> float:
    if dtype == torch.float64:
        return 1e-12
    if dtype == torch.float32:
        return 1e-6
    return 1e-3


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of ``-log 2``."""
    near_zero = x > -math.log(2.0)
    # Both branches are finite for x < 0, so torch.where has clean gradients.
    return torch.where(near_zero, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _log_tail_mass(logprobs: Tensor, mask: Tensor) -> Tensor:
    """``log(1 - sum_{k: mask} p_k)``, with the inside mass clamped below 1.

    Shapes: ``[..., K] -> [...]``.  The log of the inside mass is clamped to
    ``<= -eps`` (dtype dependent), so the result is at most ``log(eps)``-ish
    and never ``-inf``.
    """
    log_inside = _masked_logsumexp(logprobs, mask)
    return _log1mexp(log_inside.clamp(max=-_tail_eps(logprobs.dtype)))


def _kl_terms(log_p: Tensor, log_q: Tensor, mask: Tensor) -> Tensor:
    """``sum_{k: mask} exp(log_p) * (log_p - log_q)``; ``[..., K] -> [...]``."""
    terms = torch.exp(log_p) * (log_p - log_q)
    return torch.where(mask, terms, torch.zeros_like(terms)).sum(dim=-1)


def gather_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probs of ``softmax(logits / T)`` over the full vocabulary, at ``ids``.

    ``out[..., k] = logits[..., ids[..., k]] / T - logsumexp(logits / T, dim=-1)``

    Shapes: ``logits [..., V]``, ``ids [..., K]`` (int64, same leading dims)
    -> ``[..., K]`` in the dtype of ``logits``.  No reduction.

    Memory: the ``[..., V]`` log-softmax is never materialised; only the
    normaliser is.  With ``T == 1`` no ``[..., V]`` tensor is allocated at all
    (``logsumexp`` saves its input, which is ``logits`` itself, and its
    backward rebuilds the softmax transiently).  Gradients flow through both
    the gathered logits and the full normaliser.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dim() == 0 or ids.dim() != logits.dim() or ids.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"ids shape {tuple(ids.shape)} does not match logits shape {tuple(logits.shape)} "
            "in the leading dimensions"
        )
    if ids.dtype != torch.int64:
        raise ValueError(f"ids must be int64, got {ids.dtype}")
    scaled = logits if temperature == 1.0 else logits / temperature
    return scaled.gather(-1, ids) - torch.logsumexp(scaled, dim=-1, keepdim=True)


def topk_ids(logits: Tensor, k: int) -> Tensor:
    """Ids of the ``k`` largest logits per position (order: descending logit).

    Shapes: ``[..., V] -> [..., k]`` int64.  Temperature does not change the
    ranking, so raw logits can be passed.  Raises ``ValueError`` if ``k < 1``
    or ``k > V``.
    """
    vocab = logits.shape[-1]
    if k < 1:
        raise ValueError(f"topk k={k} must be >= 1")
    if k > vocab:
        raise ValueError(f"topk k={k} exceeds vocab size {vocab}")
    return torch.topk(logits, k, dim=-1).indices


def merge_support(student_ids: Tensor, teacher_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Union of two id sets per position, as ids plus a keep-mask.

    Returns ``ids = cat([student_ids, teacher_ids], -1)`` of shape
    ``[..., Ks + Kt]`` and a bool mask of the same shape that is True exactly
    at the first occurrence of each id along the last dimension.  Student ids
    come first, so teacher ids already among the student ids (and repeats
    within either list) are masked out and every token counts once.

    Inputs: ``student_ids [..., Ks]``, ``teacher_ids [..., Kt]`` (int64, same
    leading dims).  Memory is ``O(Ks + Kt)`` per position (sort-based, no
    pairwise comparison).
    """
    if student_ids.shape[:-1] != teacher_ids.shape[:-1]:
        raise ValueError(
            f"shape mismatch: student ids {tuple(student_ids.shape)} vs "
            f"teacher ids {tuple(teacher_ids.shape)} in the leading dimensions"
        )
    ids = torch.cat([student_ids, teacher_ids], dim=-1)
    # A stable sort keeps equal ids in their original order, so the first
    # element of each run of equal ids is the earliest occurrence.
    sorted_ids, order = torch.sort(ids, dim=-1, stable=True)
    first_in_run = torch.ones_like(sorted_ids, dtype=torch.bool)
    first_in_run[..., 1:] = sorted_ids[..., 1:] != sorted_ids[..., :-1]
    keep = torch.empty_like(first_in_run).scatter_(-1, order, first_in_run)
    return ids, keep


def support_reverse_kl(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mode: SupportMode = "partial",
    support_mask: Tensor | None = None,
) -> Tensor:
    """Reverse KL ``KL(p_s || p_t)`` evaluated on a support ``S``, per position.

    Inputs are full-vocabulary log-probs at the support ids, ``[..., K]``
    each; ``support_mask [..., K]`` (bool, optional) marks slots that belong
    to ``S`` (False slots, e.g. duplicates from :func:`merge_support`, are
    ignored).  Output ``[...]``, no reduction over positions.

    * ``partial``: ``sum_S p_s (log p_s - log p_t)``; can be negative.
    * ``renorm``: ``sum_S q_s (log q_s - log q_t)``, ``log q = log p - logsumexp_S(log p)``.
    * ``tail``: the ``partial`` sum plus
      ``p_s(tail) (log p_s(tail) - log p_t(tail))`` with
      ``p(tail) = 1 - sum_S p``; >= 0, exact KL when ``S`` is the whole vocab.
    """
    _check_choice(mode, _SUPPORT_MODES, "support mode")
    _check_pair(student_logprobs, teacher_logprobs)
    mask = _resolve_mask(student_logprobs, support_mask)
    if mode == "renorm":
        log_qs = student_logprobs - _masked_logsumexp(student_logprobs, mask).unsqueeze(-1)
        log_qt = teacher_logprobs - _masked_logsumexp(teacher_logprobs, mask).unsqueeze(-1)
        return _kl_terms(log_qs, log_qt, mask)
    loss = _kl_terms(student_logprobs, teacher_logprobs, mask)
    if mode == "tail":
        tail_s = _log_tail_mass(student_logprobs, mask)
        tail_t = _log_tail_mass(teacher_logprobs, mask)
        loss = loss + torch.exp(tail_s) * (tail_s - tail_t)
    return loss


def support_forward_kl(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mode: SupportMode = "partial",
    support_mask: Tensor | None = None,
) -> Tensor:
    """Forward KL ``KL(p_t || p_s)`` on a support ``S``, per position.

    Same modes, shapes (``[..., K]`` each -> ``[...]``) and mask semantics as
    :func:`support_reverse_kl` with the roles swapped, e.g. ``partial`` is
    ``sum_S p_t (log p_t - log p_s)``.  Used by the off-policy baseline over
    the teacher's top-k.
    """
    _check_choice(mode, _SUPPORT_MODES, "support mode")
    _check_pair(student_logprobs, teacher_logprobs)
    return support_reverse_kl(teacher_logprobs, student_logprobs, mode, support_mask)


def sampled_kl(
    student_logprob: Tensor, teacher_logprob: Tensor, estimator: SampledEstimator
) -> Tensor:
    """Single-sample estimators of ``KL(p_s || p_t)`` at the sampled token.

    Inputs: log-probs of the sampled token under each model, shape ``[...]``;
    output ``[...]``, no reduction.  With ``r = log p_t - log p_s``:

    * ``k1 = -r`` (unbiased, can be negative)
    * ``k2 = r**2 / 2``
    * ``k3 = exp(r) - r - 1`` with ``r`` clamped to ``[-20, 20]`` (>= 0;
      computed as ``expm1(r) - r`` for accuracy near 0)
    * ``abs = |r|``
    """
    _check_choice(estimator, _ESTIMATORS, "sampled estimator")
    if student_logprob.shape != teacher_logprob.shape:
        raise ValueError(
            f"shape mismatch: student {tuple(student_logprob.shape)} vs "
            f"teacher {tuple(teacher_logprob.shape)}"
        )
    diff = student_logprob - teacher_logprob
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff.square()
    if estimator == "abs":
        return diff.abs()
    r = (teacher_logprob - student_logprob).clamp(-_K3_CLAMP, _K3_CLAMP)
    return torch.expm1(r) - r


def nll(student_logprob: Tensor) -> Tensor:
    """Negative log-likelihood ``-log p_s(y)`` of given tokens; ``[...] -> [...]``."""
    return -student_logprob


def support_mass(logprobs: Tensor, support_mask: Tensor | None = None) -> Tensor:
    """Probability mass inside the support, ``sum_{k: mask} exp(logprobs[..., k])``.

    Shapes: ``[..., K]`` (and optional bool mask ``[..., K]``) -> ``[...]``.
    """
    mask = _resolve_mask(logprobs, support_mask)
    probs = torch.exp(logprobs)
    return torch.where(mask, probs, torch.zeros_like(probs)).sum(dim=-1)


def entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy ``-sum_v p(v) log p(v)`` of ``p = softmax(logits / T)``.

    Shapes: ``[..., V] -> [...]``, summed over the full vocabulary.  Tokens
    with zero probability (e.g. ``-inf`` logits) contribute 0.  Materialises
    a ``[..., V]`` tensor; meant for monitoring.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = torch.log_softmax(logits / temperature, dim=-1)
    p = torch.exp(logp)
    safe_logp = torch.where(p > 0, logp, torch.zeros_like(logp))
    return -(p * safe_logp).sum(dim=-1)


def aggregate(
    values: Tensor,
    mask: Tensor,
    mode: Aggregation = "token_mean",
    normalizer: float | None = None,
) -> Tensor:
    """Reduce per-token values ``[B, T]`` to a scalar over the tokens in ``mask``.

    * ``token_mean``: ``sum(values[mask]) / max(sum(mask), 1)``, or
      ``/ normalizer`` when given (a global token count across data-parallel
      ranks, so per-rank results can simply be summed).
    * ``seq_mean``: per-sequence token mean over rows with at least one token,
      then the mean over those rows; ``normalizer`` replaces the local number
      of such rows (global sequence count).

    ``mask [B, T]`` is bool or 0/1 (nonzero = counted).  Values at masked-out
    positions are discarded with ``torch.where``, so NaN/inf in padding never
    reaches the result or its gradient.  Returns a 0-dim tensor.
    """
    _check_choice(mode, _AGGREGATIONS, "aggregation")
    if values.dim() != 2 or values.shape != mask.shape:
        raise ValueError(
            f"aggregate expects values and mask of the same [B, T] shape, got "
            f"{tuple(values.shape)} and {tuple(mask.shape)}"
        )
    if normalizer is not None and normalizer <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    keep = mask.bool()
    kept = torch.where(keep, values, torch.zeros_like(values))
    counts = keep.sum(dim=-1)
    if mode == "token_mean":
        denom = normalizer if normalizer is not None else counts.sum().clamp(min=1)
        return kept.sum() / denom
    per_seq = kept.sum(dim=-1) / counts.clamp(min=1)
    has_tokens = counts > 0
    denom = normalizer if normalizer is not None else has_tokens.sum().clamp(min=1)
    return torch.where(has_tokens, per_seq, torch.zeros_like(per_seq)).sum() / denom


def aggregation_weights(mask: Tensor, mode: Aggregation = "token_mean", normalizer: float | None = None) -> Tensor:
    """The coefficients of :func:`aggregate`, which is linear in ``values``:
    ``aggregate(values, mask, mode, normalizer) == (aggregation_weights(mask, mode, normalizer) * values).sum()``
    for finite values. ``[B, T] -> [B, T]`` float32, 0 outside ``mask``. Lets a loss computed a chunk of
    tokens at a time (opcd.loss.chunked.fused_support_loss) aggregate exactly like the whole batch.
    """
    _check_choice(mode, _AGGREGATIONS, "aggregation")
    if normalizer is not None and normalizer <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    keep = mask.bool().float()
    counts = keep.sum(dim=-1, keepdim=True)
    if mode == "token_mean":
        return keep / (normalizer if normalizer is not None else counts.sum().clamp(min=1))
    rows = normalizer if normalizer is not None else (counts > 0).sum().clamp(min=1)
    return keep / counts.clamp(min=1) / rows
