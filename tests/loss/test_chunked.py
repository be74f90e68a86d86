"""Tests for the chunked lm_head path of opcd.loss.kl: log-probs at a support straight from hidden states.

The reference is always the unchunked computation: full logits ``hidden @ W.T + b``, then
``gather_logprobs`` / ``entropy`` / ``topk_ids``.  Exact comparisons run in float64.
"""

import pytest
import torch

from opcd.loss.kl import entropy, gather_logprobs, topk_ids
from opcd.loss.chunked import support_logprobs_from_hidden, support_logprobs_no_grad

F64 = torch.float64
N, H, V, K = 13, 6, 40, 5  # 13 tokens: prime, so most chunk sizes leave a ragged last chunk


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(n=N, h=H, v=V, k=K, seed=0, dtype=F64, scale=1.5):
    """hidden [n, h], weight [v, h], bias [v], ids [n, k] (repeats allowed), all leaves."""
    hidden = (torch.randn(n, h, generator=_gen(seed), dtype=dtype) * scale).requires_grad_()
    weight = (torch.randn(v, h, generator=_gen(seed + 1), dtype=dtype) * scale).requires_grad_()
    bias = torch.randn(v, generator=_gen(seed + 2), dtype=dtype).requires_grad_()
    ids = torch.randint(0, v, (n, k), generator=_gen(seed + 3))
    return hidden, weight, bias, ids


def _reference(hidden, weight, ids, temperature=1.0, bias=None):
    """Unchunked: full [N, V] logits. -> (log-probs [N, K], entropy [N], logits [N, V])"""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return gather_logprobs(logits, ids, temperature), entropy(logits, temperature), logits


def _grads(out, *leaves, seed=9):
    """Gradients of a random linear functional of `out` (so every output slot matters)."""
    coeffs = torch.randn(out.shape, generator=_gen(seed), dtype=out.dtype)
    return torch.autograd.grad((out * coeffs).sum(), leaves)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 12, 13, 64])
def test_chunked_equals_unchunked_values_and_gradients(chunk_size):
    hidden, weight, _, ids = _inputs()
    logprobs, _ = support_logprobs_from_hidden(hidden, weight, ids, chunk_size=chunk_size)
    expected, _, _ = _reference(hidden, weight, ids)
    torch.testing.assert_close(logprobs, expected, atol=1e-12, rtol=0)
    for got, want in zip(_grads(logprobs, hidden, weight), _grads(expected, hidden, weight)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_temperature_and_bias_match_the_unchunked_logits(temperature):
    hidden, weight, bias, ids = _inputs(seed=4)
    logprobs, ent = support_logprobs_from_hidden(hidden, weight, ids, temperature, chunk_size=4, lm_head_bias=bias)
    expected, expected_ent, _ = _reference(hidden, weight, ids, temperature, bias)
    torch.testing.assert_close(logprobs, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(ent, expected_ent, atol=1e-12, rtol=0)
    leaves = (hidden, weight, bias)
    for got, want in zip(_grads(logprobs, *leaves), _grads(expected, *leaves)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_entropy_equals_full_vocabulary_entropy_and_is_detached():
    hidden, weight, _, ids = _inputs(seed=5)
    with torch.no_grad():  # rows from near-uniform to peaked
        hidden.mul_(torch.linspace(0.05, 2.0, N, dtype=F64).unsqueeze(-1))
    _, ent = support_logprobs_from_hidden(hidden, weight, ids, 0.8, chunk_size=5)
    _, expected, _ = _reference(hidden, weight, ids, 0.8)
    torch.testing.assert_close(ent, expected, atol=1e-12, rtol=0)
    assert not ent.requires_grad
    assert expected.min() < 0.1 and expected.max() > 3.0


def test_float32_entropy_stays_close_to_float64():
    """The float32 entropy of a 49k vocabulary with peaked rows (logits up to ~30) is within 1e-5 nats."""
    hidden, weight, _, ids = _inputs(n=8, h=16, v=49152, seed=12, dtype=torch.float32, scale=1.0)
    with torch.no_grad():
        hidden.mul_(torch.linspace(0.1, 2.0, 8).unsqueeze(-1))
    _, ent = support_logprobs_from_hidden(hidden, weight, ids, 0.7, chunk_size=3)
    _, expected, _ = _reference(hidden.double(), weight.double(), ids, 0.7)
    assert expected.min() < 0.5 and expected.max() > 5.0
    torch.testing.assert_close(ent.double(), expected, atol=1e-5, rtol=0)


def test_full_vocabulary_support_is_normalised():
    hidden, weight, _, _ = _inputs(seed=6)
    every_id = torch.arange(V).expand(N, V).contiguous()
    logprobs, _ = support_logprobs_from_hidden(hidden, weight, every_id, 1.3, chunk_size=4)
    torch.testing.assert_close(logprobs.logsumexp(-1), torch.zeros(N, dtype=F64), atol=1e-12, rtol=0)


def test_gradcheck_through_the_checkpointed_chunks():
    hidden, weight, bias, ids = _inputs(n=5, h=3, v=7, k=3, seed=7)
    torch.autograd.gradcheck(
        lambda h, w, b: support_logprobs_from_hidden(h, w, ids, 0.9, chunk_size=2, lm_head_bias=b)[0],
        (hidden, weight, bias))


def test_low_precision_weights_match_model_logits_upcast_to_float32():
    """The worker path used `model(...).logits.float()`: lm_head in bfloat16, the softmax in float32."""
    hidden, weight, _, ids = _inputs(seed=8, dtype=torch.float32)
    hidden, weight = hidden.detach().bfloat16(), weight.detach().bfloat16()
    logprobs, ent = support_logprobs_from_hidden(hidden, weight, ids, 0.7, chunk_size=4)
    logits = torch.nn.functional.linear(hidden, weight).float()
    assert logprobs.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(logprobs, gather_logprobs(logits, ids, 0.7), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, entropy(logits, 0.7), atol=1e-5, rtol=0)


def test_no_tokens_gives_empty_outputs_that_stay_in_the_graph():
    _, weight, _, _ = _inputs()
    hidden = torch.zeros(0, H, dtype=F64, requires_grad=True)
    logprobs, ent = support_logprobs_from_hidden(hidden, weight, torch.zeros(0, K, dtype=torch.long))
    assert logprobs.shape == (0, K) and ent.shape == (0,)
    logprobs.sum().backward()  # an empty micro-batch must not break backward
    assert hidden.grad.shape == (0, H)


@pytest.mark.parametrize("chunk_size", [3, 13, 100])
@pytest.mark.parametrize("topk", [0, 1, 6])
def test_no_grad_variant_equals_the_grad_variant_and_full_topk(chunk_size, topk):
    hidden, weight, bias, ids = _inputs(seed=10)
    logprobs, ent, top = support_logprobs_no_grad(hidden, weight, ids, 1.2, chunk_size, bias, topk=topk)
    with_grad, with_grad_ent = support_logprobs_from_hidden(hidden, weight, ids, 1.2, chunk_size, bias)
    assert not logprobs.requires_grad and logprobs.shape == (N, K + topk)
    torch.testing.assert_close(logprobs[:, :K], with_grad.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(ent, with_grad_ent, atol=1e-12, rtol=0)
    _, _, logits = _reference(hidden, weight, ids, 1.2, bias)
    if topk == 0:
        assert top is None
        return
    assert torch.equal(top, topk_ids(logits, topk))
    # the extra columns are the log-probs at the top-k ids: cat([ids, top]) is merge_support's layout
    torch.testing.assert_close(logprobs[:, K:], gather_logprobs(logits, top, 1.2), atol=1e-12, rtol=0)


def _saved_tensor_sizes(fn) -> list[int]:
    """Element counts of every tensor autograd saves for backward while `fn()` runs."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    out.sum().backward()  # and the graph is still usable
    return sizes


def test_backward_never_keeps_the_full_logits():
    """Regression: the student update held [tokens, V] float32 logits (and their log-softmax) alive for
    backward, which for 8k tokens of a 152k vocabulary is ~5 GB per tensor. Chunked, nothing saved for
    backward may have N*V elements; the unchunked reference shows the check does catch that case."""
    n, v, chunk = 64, 300, 16
    hidden, weight, _, ids = _inputs(n=n, v=v, seed=11, dtype=torch.float32)
    naive = _saved_tensor_sizes(lambda: _reference(hidden, weight, ids, 0.9)[0])
    assert max(naive) >= n * v  # the recorder sees the full logits when they are kept
    chunked = _saved_tensor_sizes(
        lambda: support_logprobs_from_hidden(hidden, weight, ids, 0.9, chunk_size=chunk)[0])
    assert chunked and max(chunked) < n * v
    # nor [chunk, V] per chunk (chunking without checkpointing would still keep N*V in total)
    assert max(chunked) < chunk * v


@pytest.mark.parametrize("bad", [
    dict(temperature=0.0), dict(chunk_size=0), dict(ids=torch.zeros(N, K, dtype=torch.int32)),
    dict(ids=torch.zeros(N + 1, K, dtype=torch.long)), dict(weight=torch.zeros(V, H + 1, dtype=F64)),
    dict(lm_head_bias=torch.zeros(V + 1, dtype=F64)),
])
def test_bad_inputs_raise(bad):
    hidden, weight, _, ids = _inputs()
    args = dict(hidden=hidden, lm_head_weight=bad.pop("weight", weight), ids=bad.pop("ids", ids), **bad)
    with pytest.raises(ValueError):
        support_logprobs_from_hidden(**args)
    with pytest.raises(ValueError):
        support_logprobs_no_grad(**args)


# -- fused_support_loss: the student loss and its gradient in one chunked pass ----------------------------

from functools import partial  # noqa: E402

from opcd.loss.kl import aggregate, aggregation_weights, merge_support  # noqa: E402
from opcd.loss.chunked import fused_support_loss  # noqa: E402
from opcd.loss.objective import per_token_loss  # noqa: E402


def _teacher_logprobs(ids, v=V, seed=7, dtype=F64):
    logits = torch.randn(ids.shape[0], v, generator=_gen(seed), dtype=dtype) * 2
    return gather_logprobs(logits, ids)


CASES = [("full", "tail"), ("full", "partial"), ("full", "renorm"), ("forward_kl", "tail"), ("k3", "tail"),
         ("seqkd", "tail")]


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("kind,mode", CASES)
def test_fused_loss_equals_the_unchunked_loss_and_gradients(kind, mode, temperature, chunk_size):
    hidden, weight, bias, ids = _inputs()
    if kind in ("k3", "seqkd"):
        ids = ids[:, :1]  # the sampled token
    teacher = _teacher_logprobs(ids)
    weights = torch.rand(N, generator=_gen(5), dtype=F64)
    token_loss = partial(per_token_loss, kind, mode)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    student = gather_logprobs(logits, ids, temperature)
    expected = (token_loss(student, teacher, None) * weights).sum()
    value, logprobs, ent = fused_support_loss(hidden, weight, ids, teacher, token_loss, weights, temperature,
                                              chunk_size, bias)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logprobs, student.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, entropy(logits, temperature).detach(), rtol=0, atol=1e-12)
    assert not logprobs.requires_grad and not ent.requires_grad
    got = torch.autograd.grad(value * 3.0, (hidden, weight, bias))
    want = torch.autograd.grad(expected * 3.0, (hidden, weight, bias))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_fused_loss_with_a_merged_support_mask():
    hidden, weight, _, ids = _inputs()
    top = topk_ids(torch.nn.functional.linear(hidden, weight), 4)
    merged, mask = merge_support(ids, top)
    assert not mask.all()  # duplicates present, so the mask matters
    teacher = _teacher_logprobs(merged)
    token_loss = partial(per_token_loss, "full", "tail")
    weights = torch.full((N,), 1.0 / N, dtype=F64)
    expected = (token_loss(gather_logprobs(hidden @ weight.T, merged), teacher, mask) * weights).sum()
    value, _, _ = fused_support_loss(hidden, weight, merged, teacher, token_loss, weights, chunk_size=5,
                                     support_mask=mask)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(value, hidden)[0], torch.autograd.grad(expected, hidden)[0])


def test_fused_loss_gradcheck():
    hidden, weight, bias, ids = _inputs(n=5, h=3, v=7, k=3, scale=1.0)
    teacher = _teacher_logprobs(ids, v=7)
    weights = torch.rand(5, generator=_gen(2), dtype=F64)
    token_loss = partial(per_token_loss, "full", "tail")
    torch.autograd.gradcheck(
        lambda h, w, b: fused_support_loss(h, w, ids, teacher, token_loss, weights, 0.9, 2, b)[0],
        (hidden, weight, bias))


def test_fused_float32_log_probs_are_as_accurate_as_logsumexp():
    """The CPU log-softmax accumulates in float32 and drifts by ~2e-5 per row at V = 49k; the fused
    path corrects it. Sharp logits (down to ~-20 log-probs), as a trained model has."""
    gen = _gen(3)
    hidden = torch.randn(64, 64, generator=gen)
    weight = torch.randn(49152, 64, generator=gen) * 0.6
    ids = torch.randint(0, 49152, (64, 8), generator=gen)
    exact = gather_logprobs(hidden.double() @ weight.double().T, ids, 0.8)
    reference_error = (gather_logprobs(hidden @ weight.T, ids, 0.8).double() - exact).abs().max()
    teacher = exact.float()
    _, logprobs, _ = fused_support_loss(hidden, weight, ids, teacher, partial(per_token_loss, "full", "tail"),
                                        torch.ones(64), 0.8, chunk_size=16)
    no_grad, _, _ = support_logprobs_no_grad(hidden, weight, ids, 0.8, chunk_size=16)
    for ours in (logprobs, no_grad):
        assert (ours.double() - exact).abs().max() <= 2 * reference_error + 1e-6


def test_fused_loss_without_tokens_or_gradients():
    hidden, weight, _, ids = _inputs()
    token_loss = partial(per_token_loss, "full", "tail")
    value, logprobs, ent = fused_support_loss(hidden[:0], weight, ids[:0], _teacher_logprobs(ids)[:0], token_loss,
                                              torch.ones(0, dtype=F64))
    assert value.item() == 0.0 and logprobs.shape == (0, K) and ent.shape == (0,)
    value.backward()  # stays in the graph: a rank with no trained token still joins the collectives
    assert hidden.grad is None or not hidden.grad.any()
    with torch.no_grad():
        value, _, _ = fused_support_loss(hidden, weight, ids, _teacher_logprobs(ids), token_loss,
                                         torch.ones(N, dtype=F64))
    assert value.grad_fn is None and value.item() != 0.0


def test_fused_loss_rejects_mismatched_teacher_or_weights():
    hidden, weight, _, ids = _inputs()
    token_loss = partial(per_token_loss, "full", "tail")
    with pytest.raises(ValueError, match="teacher log-probs"):
        fused_support_loss(hidden, weight, ids, _teacher_logprobs(ids)[:, :2], token_loss, torch.ones(N, dtype=F64))
    with pytest.raises(ValueError, match="weights"):
        fused_support_loss(hidden, weight, ids, _teacher_logprobs(ids), token_loss, torch.ones(N - 1, dtype=F64))


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("normalizer", [None, 11])
def test_aggregation_weights_are_the_coefficients_of_aggregate(mode, normalizer):
    mask = torch.rand(4, 6, generator=_gen(1)) > 0.4
    mask[2] = False  # a row without tokens
    values = torch.randn(4, 6, generator=_gen(2), dtype=F64)
    weights = aggregation_weights(mask, mode, normalizer)
    torch.testing.assert_close((weights.double() * values).sum(), aggregate(values, mask, mode, normalizer))
    assert not weights[~mask].any()


def test_fused_loss_takes_low_precision_hidden_states_with_fp32_master_weights():
    """Under autocast the trunk hands over bf16 hidden states while the lm_head weight stays fp32: the
    projection runs in fp32 and the hidden-state gradient comes back in bf16."""
    hidden, weight, _, ids = _inputs(dtype=torch.float32)
    low = hidden.detach().to(torch.bfloat16).requires_grad_()
    teacher = _teacher_logprobs(ids, dtype=torch.float32)
    token_loss = partial(per_token_loss, "full", "tail")
    weights = torch.full((N,), 1.0 / N)
    value, _, _ = fused_support_loss(low, weight, ids, teacher, token_loss, weights, chunk_size=4)
    reference, _, _ = fused_support_loss(low.detach().float().requires_grad_(), weight, ids, teacher, token_loss,
                                         weights, chunk_size=4)
    torch.testing.assert_close(value, reference)
    (grad,) = torch.autograd.grad(value, low)
    assert grad.dtype == torch.bfloat16 and grad.abs().sum() > 0


def test_inputs_on_another_device_are_refused_by_name():
    """Regression: `benchmarks/loss.py --device cuda` crashed inside the fused loss's matmul (aggregation
    weights left on the CPU, hidden states on the GPU) with a message naming no tensor. The meta device
    stands in for the GPU."""
    from opcd.loss import chunked, kl

    hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
    ids, teacher = torch.zeros(3, 2, dtype=torch.long), torch.log_softmax(torch.randn(3, 2), -1)
    token_loss = lambda s, t, m: kl.support_reverse_kl(s, t, "tail", m)  # noqa: E731
    with pytest.raises(ValueError, match="weights is on meta but the hidden states are on cpu"):
        chunked.fused_support_loss(hidden, weight, ids, teacher, token_loss, torch.ones(3, device="meta"))
    with pytest.raises(ValueError, match="lm_head_weight is on meta"):
        chunked.support_logprobs_no_grad(hidden, weight.to("meta"), ids)
