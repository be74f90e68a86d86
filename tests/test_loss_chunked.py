"""Tests for the chunked lm_head path of opcd.loss: log-probs at a support straight from hidden states.

The reference is always the unchunked computation: full logits ``hidden @ W.T + b``, then
``gather_logprobs`` / ``entropy`` / ``topk_ids``.  Exact comparisons run in float64.
"""

import pytest
import torch

from opcd.loss import entropy, gather_logprobs, topk_ids
from opcd.loss_chunked import support_logprobs_from_hidden, support_logprobs_no_grad

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
