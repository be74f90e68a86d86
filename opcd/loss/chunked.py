"""Student and teacher log-probs at a support computed straight from hidden states, a chunk of tokens
at a time, so no [tokens, vocab] logits tensor is ever held (for backward or otherwise). Pure
functions, the memory-lean counterpart of `opcd.loss.kl.gather_logprobs`; measured with
`benchmarks/loss.py`. The workers use `fused_support_loss` (student) and `support_logprobs_no_grad`
(teacher) whenever the model's logits are a plain lm_head of its last hidden states
(`opcd.workers.lm_head`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# -- log-probs straight from hidden states, in token chunks ----------------------------------------


def _check_hidden_inputs(hidden: Tensor, weight: Tensor, ids: Tensor, temperature: float,
                         chunk_size: int, bias: Tensor | None) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, H] and lm_head weight [V, H], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if ids.dim() != 2 or ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"ids shape {tuple(ids.shape)} does not match hidden shape {tuple(hidden.shape)}")
    if ids.dtype != torch.int64:
        raise ValueError(f"ids must be int64, got {ids.dtype}")
    _check_same_device(hidden, lm_head_weight=weight, ids=ids, lm_head_bias=bias)
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"lm_head bias shape {tuple(bias.shape)} does not match vocab {weight.shape[0]}")


def _check_same_device(hidden: Tensor, **others: Tensor | None) -> None:
    """One line naming the tensor that is not where the hidden states are (torch's own message names none)."""
    for name, tensor in others.items():
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but the hidden states are on {hidden.device}: "
                             f"every input must be on one device")


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``[c, H] -> [c, V]`` logits: the lm_head in the weight's dtype, the result in float32 or float64.

    Matches ``model(...).logits.float()``: the projection runs in the model's dtype, only the result
    is upcast.
    """
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _softmax_from(logits: Tensor, normaliser: Tensor, temperature: float) -> Tensor:
    """``exp(logits / T - normaliser)`` as one new ``[c, V]`` tensor (computed in place)."""
    probs = logits.clone() if temperature == 1.0 else logits / temperature
    return probs.sub_(normaliser).exp_()


def _entropy_from(logits: Tensor, normaliser: Tensor, temperature: float) -> Tensor:
    """``-sum_v p log p`` with ``p = softmax(logits / T)``; ``[c, V] -> [c]``, one ``[c, V]`` temporary.

    ``entr(p) = -p log p`` (0 at ``p = 0``) is taken in place.  The cheaper
    ``normaliser - sum_v p * logits / T`` loses ~1e-3 nats to float32 cancellation when logits are large.
    """
    probs = _softmax_from(logits, normaliser, temperature)
    return torch.special.entr(probs, out=probs).sum(dim=-1)


class _Scratch:
    """Two ``[chunk, V]`` buffers reused by every chunk of a call.

    A fresh ``[chunk, V]`` tensor per chunk is page-faulted in on first touch: measured on CPU at
    [1024, 49152] float32, the lm_head matmul, log-softmax and exp into fresh tensors took 0.38 + 0.07
    + 0.08 s against 0.35 + 0.02 + 0.03 s into reused ones.
    """

    def __init__(self, rows: int, weight: Tensor):
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.logits = weight.new_empty((rows, weight.shape[0]), dtype=dtype)
        self.logp = torch.empty_like(self.logits)

    def log_softmax(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
        """``[c, H]`` -> log-softmax of ``(hidden @ W.T + b) / T``, ``[c, V]`` (a view of a buffer)."""
        logits = self.logits[:hidden.shape[0]]
        if hidden.dtype != weight.dtype:  # e.g. bf16 hidden states from autocast, fp32 master weights
            hidden = hidden.to(weight.dtype)
        if weight.dtype == logits.dtype:
            if bias is None:
                torch.mm(hidden, weight.t(), out=logits)
            else:
                torch.addmm(bias, hidden, weight.t(), out=logits)
        else:  # 16-bit lm_head: project in the model's dtype, upcast the result (as `.logits.float()`)
            logits.copy_(torch.nn.functional.linear(hidden, weight, bias))
        if temperature != 1.0:
            logits.div_(temperature)
        return torch.log_softmax(logits, dim=-1, out=self.logp[:hidden.shape[0]])

    def softmax(self, logp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[c, V]`` log-softmax -> (softmax ``[c, V]`` in the logits buffer, free to overwrite;
        ``log_total [c, 1]``; entropy ``[c]``).

        The CPU log-softmax sums the exponentials sequentially in float32: its log-probs are off by a
        per-row constant of ~2e-5 at V = 49k (the exact ``logsumexp`` is ~1e-6), enough to move a tail-
        bucket KL by 1e-3 relative. ``sum(exp(logp))`` (a pairwise sum) measures that constant:
        ``log_total``, to subtract from the log-probs used. The softmax is normalised in place, and the
        entropy ``-sum_v p log p`` is taken with the ``log p`` at hand (no log pass, no cancellation).
        """
        probs = torch.exp(logp, out=self.logits[:logp.shape[0]])
        total = probs.sum(dim=-1, keepdim=True)
        log_total = total.log()
        entropy = log_total.squeeze(-1) - torch.einsum("cv,cv->c", probs, logp) / total.squeeze(-1)
        return probs.div_(total), log_total, entropy


class _GatherLogSoftmax(torch.autograd.Function):
    """``logits [c, V], ids [c, K] -> (logits/T).gather(ids) - logsumexp(logits/T)`` (and the normaliser
    ``[c, 1]``, not differentiable).

    Autograd's own backward of ``gather`` and ``logsumexp`` builds three or four ``[c, V]`` tensors; this
    one builds one: ``d out[k] / d s[v] = [v == ids[k]] - softmax(s)[v]``, so the gradient w.r.t. ``s``
    is ``scatter_add(-softmax(s) * sum_k g[k], ids, g)``, written in place into the softmax.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        scaled = logits if temperature == 1.0 else logits / temperature
        normaliser = torch.logsumexp(scaled, dim=-1, keepdim=True)  # [c, 1]
        ctx.save_for_backward(logits, ids, normaliser)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(normaliser)
        return scaled.gather(-1, ids) - normaliser, normaliser

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_normaliser: Tensor) -> tuple[Tensor, None, None]:
        logits, ids, normaliser = ctx.saved_tensors
        grad_logits = _softmax_from(logits, normaliser, ctx.temperature)  # [c, V]
        grad_logits.mul_(-grad.sum(dim=-1, keepdim=True)).scatter_add_(-1, ids, grad)
        if ctx.temperature != 1.0:
            grad_logits.div_(ctx.temperature)
        return grad_logits, None, None


def _chunk_support_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor,
                            temperature: float) -> tuple[Tensor, Tensor]:
    """One chunk: ``[c, H]`` hidden and ``[c, K]`` ids -> (log-probs ``[c, K]``, entropy ``[c]``)."""
    logits = _chunk_logits(hidden, weight, bias)  # [c, V]
    logprobs, normaliser = _GatherLogSoftmax.apply(logits, ids, temperature)
    # The entropy is a metric: no graph. Under non-reentrant checkpointing the backward recompute stops
    # once the last tensor saved for backward is rebuilt, so this line is not re-run in backward.
    with torch.no_grad():
        ent = _entropy_from(logits, normaliser, temperature)
    return logprobs, ent


def support_logprobs_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    ids: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    lm_head_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Student log-probs at a support and per-token entropy, from the last hidden states.

    With ``z = hidden @ W.T + b`` (the lm_head) and ``s = z / T``::

        out[n, k] = s[n, ids[n, k]] - logsumexp_v s[n, v]       (full-vocabulary normaliser)
        ent[n]    = -sum_v p[n, v] log p[n, v],   p = softmax(s[n])

    i.e. ``gather_logprobs(z, ids, T)`` and ``entropy(z, T)`` of the unchunked logits.  The support
    is whatever ``ids`` holds (top-k, merged ids, the sampled token); no reduction over positions.

    Shapes: ``hidden [N, H]``, ``lm_head_weight [V, H]``, ``lm_head_bias [V]`` or None,
    ``ids [N, K]`` int64 -> (``[N, K]``, ``[N]``).  The projection runs in the weight's dtype and
    the logits are upcast to float32 (as ``model(...).logits.float()``); float64 inputs stay float64.
    Gradients flow to ``hidden``, ``lm_head_weight`` and ``lm_head_bias`` exactly as through the
    unchunked computation; the entropy is returned detached (a metric).

    Memory: the tokens are processed ``chunk_size`` at a time and each chunk runs under
    ``torch.utils.checkpoint`` (non-reentrant).  Autograd therefore keeps only the chunk inputs
    (views of ``hidden``, the weight) and the ``[N, K]`` outputs; the ``[chunk, V]`` logits exist
    transiently in the forward, and again in the backward, where each chunk is recomputed, its
    gradient taken and freed before the next.  The gradient of the log-softmax-and-gather is built in
    place in a single ``[chunk, V]`` tensor (:class:`_GatherLogSoftmax`), so the backward peak is about
    two ``[chunk, V]`` float32 tensors plus the ``[V, H]`` weight gradient, against three ``[N, V]``
    ones (log-softmax, its gradient, the gather's gradient) on the unchunked path.  The price is one
    extra lm_head matmul and one extra ``logsumexp`` per chunk in the backward.
    """
    _check_hidden_inputs(hidden, lm_head_weight, ids, temperature, chunk_size, lm_head_bias)
    needs_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, lm_head_weight, lm_head_bias))
    logprobs, entropies = [], []
    # max(N, 1): an empty input still makes one (empty) chunk, so the outputs stay in the graph
    for start in range(0, max(hidden.shape[0], 1), chunk_size):
        chunk = slice(start, start + chunk_size)
        args = (hidden[chunk], lm_head_weight, lm_head_bias, ids[chunk], temperature)
        if needs_graph:
            lp, ent = checkpoint(_chunk_support_logprobs, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            lp, ent = _chunk_support_logprobs(*args)
        logprobs.append(lp)
        entropies.append(ent)
    return torch.cat(logprobs), torch.cat(entropies)


@torch.no_grad()
def support_logprobs_no_grad(
    hidden: Tensor,
    lm_head_weight: Tensor,
    ids: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    lm_head_bias: Tensor | None = None,
    topk: int = 0,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Teacher side of :func:`support_logprobs_from_hidden`: no graph, optionally its own top-k.

    Same formula, dtypes and chunking (``[chunk_size, V]`` logits at a time, nothing kept).  With
    ``topk > 0`` the ids of the ``topk`` largest logits per token (descending; ``T`` does not change
    the ranking) are computed from the same chunk and the log-probs are returned at
    ``cat([ids, topk_ids], -1)`` -- the id layout of :func:`merge_support` -- so a merged support
    costs no second lm_head pass.

    Shapes: ``hidden [N, H]``, ``lm_head_weight [V, H]``, ``ids [N, K]`` int64 ->
    (log-probs ``[N, K + topk]``, entropy ``[N]``, ``topk_ids [N, topk]`` int64 or None when
    ``topk == 0``).
    """
    _check_hidden_inputs(hidden, lm_head_weight, ids, temperature, chunk_size, lm_head_bias)
    if topk < 0 or topk > lm_head_weight.shape[0]:
        raise ValueError(f"topk={topk} must be in [0, vocab size {lm_head_weight.shape[0]}]")
    dtype = torch.float64 if lm_head_weight.dtype == torch.float64 else torch.float32
    logprobs = hidden.new_empty((hidden.shape[0], ids.shape[1] + topk), dtype=dtype)
    entropies = hidden.new_empty((hidden.shape[0],), dtype=dtype)
    top = hidden.new_empty((hidden.shape[0], topk), dtype=torch.int64) if topk else None
    scratch = _Scratch(min(chunk_size, hidden.shape[0]), lm_head_weight)
    for start in range(0, hidden.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        logp = scratch.log_softmax(hidden[chunk], lm_head_weight, lm_head_bias, temperature)  # [c, V]
        chunk_ids = ids[chunk]
        if top is not None:  # the log-softmax is monotone in the logits: same ranking
            top[chunk] = torch.topk(logp, topk, dim=-1).indices
            chunk_ids = torch.cat([chunk_ids, top[chunk]], dim=-1)
        _, log_total, entropies[chunk] = scratch.softmax(logp)
        logprobs[chunk] = logp.gather(-1, chunk_ids) - log_total
    return logprobs, entropies, top


# -- the whole student loss and its gradient in one chunked pass ----------------------------------------

TokenLoss = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


class _FusedSupportLoss(torch.autograd.Function):
    """``sum_n weights[n] * token_loss(student_logprobs[n], teacher_logprobs[n])`` with the student
    log-probs taken from ``hidden @ W.T + b``; its gradient is computed in the forward, chunk by chunk.

    The per-token loss only depends on its own token's ``[K]`` log-probs, so each chunk's gradient is
    final as soon as the chunk is scored: ``d loss / d logprobs`` comes from a small autograd graph over
    ``[c, K]``, turns into ``d loss / d logits`` in place in the chunk's softmax (as in
    :class:`_GatherLogSoftmax`), and into the hidden and weight gradients by two matmuls. Three lm_head
    matmuls in all, as many as the unchunked backward, and no ``[c, V]`` logits kept, nor recomputed.
    The backward only scales the stored gradients by the incoming scalar.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, teacher_logprobs, support_mask, weights, token_loss,
                temperature, chunk_size, out):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32  # accumulate in >= fp32
        grad_weight = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
        grad_bias = weight.new_zeros(weight.shape[:1], dtype=acc) if ctx.needs_input_grad[2] else None
        total = hidden.new_zeros((), dtype=torch.float64)
        scratch = _Scratch(min(chunk_size, hidden.shape[0]), weight)
        for start in range(0, hidden.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            h = hidden[chunk]
            logp = scratch.log_softmax(h, weight, bias, temperature)  # [c, V]
            probs, log_total, out["entropy"][chunk] = scratch.softmax(logp)
            logprobs = logp.gather(-1, ids[chunk]) - log_total
            mask = None if support_mask is None else support_mask[chunk]
            with torch.enable_grad():
                leaf = logprobs.requires_grad_(needs_grad)
                value = (token_loss(leaf, teacher_logprobs[chunk], mask) * weights[chunk]).sum()
                grad = torch.autograd.grad(value, leaf)[0] if needs_grad else None
            total += value.detach().double()
            out["logprobs"][chunk] = logprobs.detach()
            if grad is None:
                continue
            # d logprobs[k] / d s[v] = [v == ids[k]] - p[v]: the gradient w.r.t. the scaled logits
            grad_logits = probs.mul_(-grad.sum(dim=-1, keepdim=True)).scatter_add_(-1, ids[chunk], grad)
            if temperature != 1.0:
                grad_logits.div_(temperature)
            if grad_hidden is not None:
                if grad_hidden.dtype == weight.dtype == grad_logits.dtype:
                    torch.mm(grad_logits, weight, out=grad_hidden[chunk])
                else:
                    grad_hidden[chunk] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h.to(grad_weight.dtype))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        return total.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output.to(torch.float32)
        return (None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype),
                None if grad_bias is None else (grad_bias * scale).to(ctx.weight_dtype),
                None, None, None, None, None, None, None, None)


def fused_support_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    ids: Tensor,
    teacher_logprobs: Tensor,
    token_loss: TokenLoss,
    weights: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    lm_head_bias: Tensor | None = None,
    support_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The student's whole distillation loss from its last hidden states, never holding ``[N, V]``.

    ``loss = sum_n weights[n] * token_loss(s[n], teacher_logprobs[n], support_mask[n])`` where
    ``s[n] = gather_logprobs(hidden[n] @ W.T + b, ids[n], T)``: any per-token loss of the support
    log-probs (``opcd.loss.objective.per_token_loss``), any linear aggregation (``weights`` are the
    aggregation's coefficients, e.g. ``1 / tokens`` for a token mean).

    Shapes: ``hidden [N, H]``, ``lm_head_weight [V, H]``, ``ids``/``teacher_logprobs``/``support_mask``
    ``[N, K]``, ``weights [N]``. Returns (loss, a 0-dim tensor with gradients to ``hidden``, the
    weight and the bias; student log-probs ``[N, K]`` and entropy ``[N]``, both detached).

    Memory: one ``[chunk_size, V]`` float32 tensor at a time plus the ``[V, H]`` weight gradient;
    the gradients are computed during the forward (see :class:`_FusedSupportLoss`), so the backward
    costs two scalings.
    """
    _check_hidden_inputs(hidden, lm_head_weight, ids, temperature, chunk_size, lm_head_bias)
    if teacher_logprobs.shape != ids.shape or weights.shape != ids.shape[:1]:
        raise ValueError(f"teacher log-probs {tuple(teacher_logprobs.shape)} and weights {tuple(weights.shape)} "
                         f"do not match ids {tuple(ids.shape)}")
    _check_same_device(hidden, teacher_logprobs=teacher_logprobs, weights=weights, support_mask=support_mask)
    dtype = torch.float64 if lm_head_weight.dtype == torch.float64 else torch.float32
    out = {"logprobs": hidden.new_empty(ids.shape, dtype=dtype),
           "entropy": hidden.new_empty(ids.shape[:1], dtype=dtype)}
    value = _FusedSupportLoss.apply(hidden, lm_head_weight, lm_head_bias, ids, teacher_logprobs.to(dtype),
                                    support_mask, weights.to(dtype), token_loss, temperature, chunk_size, out)
    return value, out["logprobs"], out["entropy"]
