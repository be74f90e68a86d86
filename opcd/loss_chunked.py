"""Student and teacher log-probs at a support computed straight from hidden states, a chunk of tokens
at a time, so no [tokens, vocab] logits tensor is ever held (for backward or otherwise). Pure
functions, the memory-lean counterpart of `opcd.loss.gather_logprobs`; measured with
`benchmarks/loss.py`. Not yet wired into the workers (they use the full-logits path).
"""

from __future__ import annotations

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
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"lm_head bias shape {tuple(bias.shape)} does not match vocab {weight.shape[0]}")


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
    for start in range(0, hidden.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        scaled = _chunk_logits(hidden[chunk], lm_head_weight, lm_head_bias)  # [c, V]
        if temperature != 1.0:
            scaled = scaled.div_(temperature)  # in place: no graph, and the lm_head output is ours
        chunk_ids = ids[chunk]
        if top is not None:
            top[chunk] = torch.topk(scaled, topk, dim=-1).indices
            chunk_ids = torch.cat([chunk_ids, top[chunk]], dim=-1)
        normaliser = torch.logsumexp(scaled, dim=-1, keepdim=True)  # [c, 1]
        logprobs[chunk] = scaled.gather(-1, chunk_ids) - normaliser
        probs = scaled.sub_(normaliser).exp_()  # in place: the logits are not needed any more
        entropies[chunk] = torch.special.entr(probs, out=probs).sum(dim=-1)
    return logprobs, entropies, top
