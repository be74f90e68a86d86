"""Tests for opcd.loss.kl: support KLs against brute force, gradients, aggregation."""

import math

import pytest
import torch

from opcd.loss.kl import (
    aggregate,
    entropy,
    gather_logprobs,
    merge_support,
    nll,
    sampled_kl,
    support_forward_kl,
    support_mass,
    support_reverse_kl,
    topk_ids,
)

MODES = ("partial", "renorm", "tail")
ESTIMATORS = ("k1", "k2", "k3", "abs")
F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _logits(*shape, seed=0, scale=2.0):
    return torch.randn(*shape, generator=_gen(seed), dtype=F64) * scale


def _full_ids(logits):
    vocab = logits.shape[-1]
    return torch.arange(vocab).expand(logits.shape).contiguous()


def _exact_kl(p_logits, q_logits, temperature=1.0):
    """Brute-force KL(p || q) over the full vocabulary, [..., V] -> [...]."""
    logp = torch.log_softmax(p_logits / temperature, dim=-1)
    logq = torch.log_softmax(q_logits / temperature, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _bucket_kl(p, q):
    """KL between explicit probability vectors (last dim), [..., N] -> [...]."""
    return (p * (p.log() - q.log())).sum(-1)


# ---------------------------------------------------------------- gather / topk


def test_gather_logprobs_matches_log_softmax():
    logits = _logits(3, 5, 17, seed=1)
    ids = torch.randint(0, 17, (3, 5, 6), generator=_gen(2))
    for temperature in (1.0, 0.7, 2.5):
        got = gather_logprobs(logits, ids, temperature)
        want = torch.log_softmax(logits / temperature, dim=-1).gather(-1, ids)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_gather_logprobs_gradient_flows_through_normaliser():
    logits = _logits(2, 9, seed=3).requires_grad_()
    ids = torch.tensor([[0], [4]])
    gather_logprobs(logits, ids, 0.8).sum().backward()
    ref = logits.detach().clone().requires_grad_()
    torch.log_softmax(ref / 0.8, -1).gather(-1, ids).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad, atol=1e-12, rtol=0)
    # Every vocab entry is touched through the normaliser, not just the ids.
    assert (logits.grad != 0).all()


def test_topk_ids_are_largest_and_temperature_invariant():
    logits = _logits(4, 30, seed=4)
    ids = topk_ids(logits, 5)
    assert ids.dtype == torch.int64
    want = torch.sort(logits, dim=-1, descending=True).indices[..., :5]
    assert torch.equal(ids, want)
    assert torch.equal(topk_ids(logits / 0.3, 5), ids)


def test_topk_k_too_large_raises():
    with pytest.raises(ValueError, match=r"topk k=300 exceeds vocab size 256"):
        topk_ids(torch.zeros(2, 256), 300)
    with pytest.raises(ValueError, match=r"k=0"):
        topk_ids(torch.zeros(2, 256), 0)


# ---------------------------------------------------------------- identities


def test_identical_distributions_give_zero():
    logits = _logits(3, 4, 20, seed=5)
    ids = topk_ids(logits, 6)
    lp = gather_logprobs(logits, ids, 0.9)
    for mode in MODES:
        assert torch.all(support_reverse_kl(lp, lp.clone(), mode).abs() < 1e-12), mode
        assert torch.all(support_forward_kl(lp, lp.clone(), mode).abs() < 1e-12), mode
    for est in ESTIMATORS:
        assert torch.all(sampled_kl(lp[..., 0], lp[..., 0].clone(), est) == 0), est


@pytest.mark.parametrize("mode", MODES)
def test_full_vocab_support_equals_exact_kl(mode):
    temperature = 0.7
    s_logits, t_logits = _logits(3, 4, 11, seed=6), _logits(3, 4, 11, seed=7)
    ids = _full_ids(s_logits)
    ls = gather_logprobs(s_logits, ids, temperature)
    lt = gather_logprobs(t_logits, ids, temperature)
    # Loop-based brute force for one position, vectorised for all.
    p = torch.softmax(s_logits[1, 2] / temperature, -1)
    q = torch.softmax(t_logits[1, 2] / temperature, -1)
    loop = sum(p[v] * (p[v].log() - q[v].log()) for v in range(11))
    rev = support_reverse_kl(ls, lt, mode)
    torch.testing.assert_close(rev[1, 2], loop, atol=1e-10, rtol=0)
    torch.testing.assert_close(rev, _exact_kl(s_logits, t_logits, temperature), atol=1e-10, rtol=0)
    fwd = support_forward_kl(ls, lt, mode)
    torch.testing.assert_close(fwd, _exact_kl(t_logits, s_logits, temperature), atol=1e-10, rtol=0)


def test_pinned_hand_computed_values():
    # Vocab of 3: p_s = [0.5, 0.3, 0.2], p_t = [0.25, 0.25, 0.5], S = {0, 1}.
    ls = torch.tensor([0.5, 0.3], dtype=F64).log()
    lt = torch.tensor([0.25, 0.25], dtype=F64).log()
    # partial = 0.5 ln(0.5/0.25) + 0.3 ln(0.3/0.25) = 0.5 ln 2 + 0.3 ln 1.2 = 0.401270057318...
    partial = 0.5 * math.log(2) + 0.3 * math.log(1.2)
    # renorm: q_s = [0.625, 0.375], q_t = [0.5, 0.5]
    #   = 0.625 ln 1.25 + 0.375 ln 0.75 = 0.031583942402...
    renorm = 0.625 * math.log(1.25) + 0.375 * math.log(0.75)
    # tail: partial + 0.2 ln(0.2/0.5) = 0.218011910943... (= exact KL, the tail is one token)
    tail = partial + 0.2 * math.log(0.4)
    expected = {"partial": 0.401270057318, "renorm": 0.031583942402, "tail": 0.218011910943}
    for mode, formula in (("partial", partial), ("renorm", renorm), ("tail", tail)):
        got = support_reverse_kl(ls, lt, mode).item()
        assert abs(got - formula) < 1e-12, mode
        assert abs(got - expected[mode]) < 1e-9, mode
    # forward partial = 0.25 ln(0.25/0.5) + 0.25 ln(0.25/0.3) = -0.218867184338...
    fwd = support_forward_kl(ls, lt, "partial").item()
    assert abs(fwd - (0.25 * math.log(0.5) + 0.25 * math.log(0.25 / 0.3))) < 1e-12
    assert abs(fwd - (-0.218867184338)) < 1e-9


# ---------------------------------------------------------------- partial supports


def test_renorm_equals_kl_of_renormalised_distributions():
    s_logits, t_logits = _logits(5, 13, seed=8), _logits(5, 13, seed=9)
    ids = topk_ids(s_logits, 4)
    ls = gather_logprobs(s_logits, ids, 1.3)
    lt = gather_logprobs(t_logits, ids, 1.3)
    ps = torch.softmax(s_logits / 1.3, -1).gather(-1, ids)
    pt = torch.softmax(t_logits / 1.3, -1).gather(-1, ids)
    want = _bucket_kl(ps / ps.sum(-1, keepdim=True), pt / pt.sum(-1, keepdim=True))
    torch.testing.assert_close(support_reverse_kl(ls, lt, "renorm"), want, atol=1e-12, rtol=0)
    want_fwd = _bucket_kl(pt / pt.sum(-1, keepdim=True), ps / ps.sum(-1, keepdim=True))
    torch.testing.assert_close(support_forward_kl(ls, lt, "renorm"), want_fwd, atol=1e-12, rtol=0)


def test_tail_equals_bucket_kl_and_is_nonnegative():
    for seed in range(40):
        vocab = 6 + seed % 7
        k = 1 + seed % 4
        s_logits = _logits(8, vocab, seed=100 + seed, scale=3.0)
        t_logits = _logits(8, vocab, seed=200 + seed, scale=3.0)
        ids = topk_ids(s_logits if seed % 2 else t_logits, k)
        ls, lt = gather_logprobs(s_logits, ids), gather_logprobs(t_logits, ids)
        ps = torch.softmax(s_logits, -1).gather(-1, ids)
        pt = torch.softmax(t_logits, -1).gather(-1, ids)
        # (K+1)-bucket distributions built by hand: the support plus one tail bucket.
        bs = torch.cat([ps, 1 - ps.sum(-1, keepdim=True)], -1)
        bt = torch.cat([pt, 1 - pt.sum(-1, keepdim=True)], -1)
        tail = support_reverse_kl(ls, lt, "tail")
        torch.testing.assert_close(tail, _bucket_kl(bs, bt), atol=1e-10, rtol=0)
        assert (tail >= 0).all()
        # A coarse-graining never exceeds the exact KL.
        assert (tail <= _exact_kl(s_logits, t_logits) + 1e-10).all()
        fwd = support_forward_kl(ls, lt, "tail")
        torch.testing.assert_close(fwd, _bucket_kl(bt, bs), atol=1e-10, rtol=0)


def test_partial_can_be_negative_but_tail_cannot():
    # p_s = [0.1, 0.45, 0.45], p_t = [0.5, 0.25, 0.25], S = {0}:
    # partial = 0.1 ln(0.1/0.5) < 0, tail = that + 0.9 ln(0.9/0.5) > 0.
    ls = torch.tensor([[0.1]], dtype=F64).log()
    lt = torch.tensor([[0.5]], dtype=F64).log()
    partial = support_reverse_kl(ls, lt, "partial")
    tail = support_reverse_kl(ls, lt, "tail")
    assert partial.item() == pytest.approx(0.1 * math.log(0.2), abs=1e-12)
    assert partial.item() < 0
    assert tail.item() == pytest.approx(0.1 * math.log(0.2) + 0.9 * math.log(1.8), abs=1e-12)
    assert tail.item() > 0


def test_partial_rewards_moving_mass_outside_support_tail_does_not():
    # Student moves mass off its top token (the support) to outside tokens.
    lt = torch.tensor([0.5], dtype=F64).log()
    before = torch.tensor([0.5], dtype=F64).log()  # matches teacher on S
    after = torch.tensor([0.2], dtype=F64).log()
    assert support_reverse_kl(after, lt, "partial") < support_reverse_kl(before, lt, "partial")
    assert support_reverse_kl(after, lt, "tail") > support_reverse_kl(before, lt, "tail")


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_tail_is_finite_when_support_holds_all_mass(dtype):
    # One token holds essentially all the mass: inside mass rounds to 1.
    s_logits = torch.tensor([[60.0, 0.0, 0.0, 0.0]], dtype=dtype, requires_grad=True)
    t_logits = torch.tensor([[0.0, 60.0, 0.0, 0.0]], dtype=dtype)
    for ids in (torch.tensor([[0]]), torch.tensor([[0, 1, 2, 3]])):
        ls = gather_logprobs(s_logits, ids)
        lt = gather_logprobs(t_logits, ids)
        loss = support_reverse_kl(ls, lt, "tail").sum()
        (grad,) = torch.autograd.grad(loss, s_logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # Full vocabulary with float32: tail contributes ~0, matches the exact KL.
    s32 = _logits(2, 50, seed=11).float()
    t32 = _logits(2, 50, seed=12).float()
    ids = _full_ids(s32)
    got = support_reverse_kl(gather_logprobs(s32, ids), gather_logprobs(t32, ids), "tail")
    torch.testing.assert_close(got, _exact_kl(s32, t32), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_gradcheck_through_gather_and_kl(mode, direction):
    s_logits = _logits(2, 3, 9, seed=13).requires_grad_()
    t_logits = _logits(2, 3, 9, seed=14)
    s_ids = topk_ids(s_logits.detach(), 3)
    ids, mask = merge_support(s_ids, topk_ids(t_logits, 3))
    fn = support_reverse_kl if direction == "reverse" else support_forward_kl

    def loss(x):
        ls = gather_logprobs(x, ids, 0.8)
        lt = gather_logprobs(t_logits, ids, 0.8)
        return fn(ls, lt, mode, mask)

    assert torch.autograd.gradcheck(loss, (s_logits,), eps=1e-6, atol=1e-7)


def test_full_vocab_partial_gradient_equals_exact_kl_gradient():
    temperature = 1.4
    s_logits = _logits(3, 12, seed=15).requires_grad_()
    t_logits = _logits(3, 12, seed=16)
    ids = _full_ids(s_logits)
    loss = support_reverse_kl(
        gather_logprobs(s_logits, ids, temperature), gather_logprobs(t_logits, ids, temperature)
    ).sum()
    (grad,) = torch.autograd.grad(loss, s_logits)
    ref = s_logits.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(_exact_kl(ref, t_logits, temperature).sum(), ref)
    torch.testing.assert_close(grad, want, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- merge_support


def test_merge_support_masks_duplicates():
    student = torch.tensor([[3, 1, 4], [0, 1, 2]])
    teacher = torch.tensor([[4, 5, 5], [2, 1, 0]])
    ids, mask = merge_support(student, teacher)
    assert torch.equal(ids, torch.tensor([[3, 1, 4, 4, 5, 5], [0, 1, 2, 2, 1, 0]]))
    want = torch.tensor(
        [[True, True, True, False, True, False], [True, True, True, False, False, False]]
    )
    assert torch.equal(mask, want)


@pytest.mark.parametrize("mode", MODES)
def test_merged_support_loss_equals_deduplicated_union(mode):
    s_logits, t_logits = _logits(6, 10, seed=17), _logits(6, 10, seed=18)
    ids, mask = merge_support(topk_ids(s_logits, 3), topk_ids(t_logits, 3))
    ls, lt = gather_logprobs(s_logits, ids), gather_logprobs(t_logits, ids)
    got = support_reverse_kl(ls, lt, mode, mask)
    got_fwd = support_forward_kl(ls, lt, mode, mask)
    ps_all, pt_all = torch.softmax(s_logits, -1), torch.softmax(t_logits, -1)
    for row in range(6):
        union = sorted(set(ids[row].tolist()))
        assert sorted(ids[row][mask[row]].tolist()) == union
        ps, pt = ps_all[row, union], pt_all[row, union]
        if mode == "renorm":
            ps, pt = ps / ps.sum(), pt / pt.sum()
        if mode == "tail":
            ps = torch.cat([ps, (1 - ps.sum()).reshape(1)])
            pt = torch.cat([pt, (1 - pt.sum()).reshape(1)])
        torch.testing.assert_close(got[row], _bucket_kl(ps, pt), atol=1e-12, rtol=0)
        torch.testing.assert_close(got_fwd[row], _bucket_kl(pt, ps), atol=1e-12, rtol=0)


def test_support_mass():
    logits = _logits(4, 8, seed=19)
    ids, mask = merge_support(topk_ids(logits, 2), topk_ids(logits, 3))
    lp = gather_logprobs(logits, ids)
    probs = torch.softmax(logits, -1)
    want = torch.sort(probs, -1, descending=True).values[..., :3].sum(-1)
    torch.testing.assert_close(support_mass(lp, mask), want, atol=1e-12, rtol=0)
    full = gather_logprobs(logits, _full_ids(logits))
    torch.testing.assert_close(support_mass(full), torch.ones(4, dtype=F64), atol=1e-12, rtol=0)


# ---------------------------------------------------------------- sampled / nll / entropy


def test_sampled_estimators_known_values():
    s = torch.tensor([math.log(0.5), math.log(0.25)], dtype=F64)
    t = torch.tensor([math.log(0.25), math.log(0.5)], dtype=F64)
    ln2 = math.log(2)
    # r = t - s = [-ln2, ln2]
    want = {
        "k1": [ln2, -ln2],
        "k2": [0.5 * ln2**2, 0.5 * ln2**2],
        "k3": [0.5 + ln2 - 1, 2 - ln2 - 1],  # exp(r) - r - 1
        "abs": [ln2, ln2],
    }
    for est, values in want.items():
        got = sampled_kl(s, t, est)
        torch.testing.assert_close(got, torch.tensor(values, dtype=F64), atol=1e-12, rtol=0)


def test_k3_nonnegative_and_no_nan_on_extremes():
    s = torch.randn(10000, generator=_gen(20), dtype=F64) * 10
    t = torch.randn(10000, generator=_gen(21), dtype=F64) * 10
    assert (sampled_kl(s, t, "k3") >= 0).all()
    s32 = torch.tensor([0.0, -1e4, -80.0, -1e-8, 0.0], requires_grad=True)
    t32 = torch.tensor([-1e4, 0.0, -1e-8, -80.0, float("-inf")])
    for est in ESTIMATORS:
        out = sampled_kl(s32, t32, est)
        assert not torch.isnan(out).any(), est
        if est != "k1":
            assert (out >= 0).all(), est
    k3 = sampled_kl(s32, t32, "k3")
    assert torch.isfinite(k3).all()
    # r clamped to [-20, 20]: r = -1e4 -> exp(-20) + 20 - 1.
    assert k3[0].item() == pytest.approx(math.exp(-20) + 19, rel=1e-6)
    assert k3[1].item() == pytest.approx(math.exp(20) - 21, rel=1e-6)
    (grad,) = torch.autograd.grad(k3.sum(), s32)
    assert torch.isfinite(grad).all()


def test_nll_and_entropy():
    lp = torch.tensor([math.log(0.25), 0.0], dtype=F64)
    torch.testing.assert_close(nll(lp), torch.tensor([math.log(4), 0.0], dtype=F64))
    # Uniform over 4 -> ln 4; T rescales logits before the softmax.
    uniform = torch.zeros(4, dtype=F64)
    assert entropy(uniform).item() == pytest.approx(math.log(4), abs=1e-12)
    logits = _logits(3, 7, seed=22)
    p = torch.softmax(logits / 0.5, -1)
    torch.testing.assert_close(entropy(logits, 0.5), -(p * p.log()).sum(-1), atol=1e-12, rtol=0)
    # -inf logits contribute zero, and gradients stay finite.
    masked = torch.tensor([0.0, 0.0, float("-inf")], dtype=F64, requires_grad=True)
    h = entropy(masked)
    assert h.item() == pytest.approx(math.log(2), abs=1e-12)
    h.backward()
    assert torch.isfinite(masked.grad).all()


# ---------------------------------------------------------------- aggregate


def test_aggregate_token_and_seq_mean():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    # token_mean: (1+2+3+4+10) / 5 = 4; seq_mean: (2.5 + 10) / 2 = 6.25 (empty row skipped).
    assert aggregate(values, mask, "token_mean").item() == pytest.approx(4.0)
    assert aggregate(values, mask.bool(), "seq_mean").item() == pytest.approx(6.25)
    # Global normalisers replace the local counts.
    assert aggregate(values, mask, "token_mean", normalizer=10).item() == pytest.approx(2.0)
    assert aggregate(values, mask, "seq_mean", normalizer=5).item() == pytest.approx(2.5)
    # Nothing unmasked: 0, not NaN.
    assert aggregate(values, torch.zeros_like(mask), "token_mean").item() == 0.0
    assert aggregate(values, torch.zeros_like(mask), "seq_mean").item() == 0.0


def test_aggregate_nan_in_padding_does_not_leak():
    values = torch.tensor(
        [[1.0, 3.0, float("nan")], [2.0, float("inf"), float("-inf")]], requires_grad=True
    )
    mask = torch.tensor([[True, True, False], [True, False, False]])
    for mode, want in (("token_mean", 2.0), ("seq_mean", 2.0)):
        out = aggregate(values, mask, mode)
        assert out.item() == pytest.approx(want)
        (grad,) = torch.autograd.grad(out, values)
        assert torch.isfinite(grad).all()
        assert (grad[~mask] == 0).all()


def test_chunked_equals_unchunked():
    torch.manual_seed(0)
    b, t, v, k = 3, 10, 23, 4
    s_logits, t_logits = _logits(b, t, v, seed=23), _logits(b, t, v, seed=24)
    mask = torch.rand(b, t, generator=_gen(25)) > 0.3
    n_tokens = int(mask.sum())

    def per_token(sl, tl):
        ids, keep = merge_support(topk_ids(sl, k), topk_ids(tl, k))
        ls, lt = gather_logprobs(sl, ids, 0.9), gather_logprobs(tl, ids, 0.9)
        return support_reverse_kl(ls, lt, "tail", keep)

    s_full = s_logits.clone().requires_grad_()
    whole = aggregate(per_token(s_full, t_logits), mask)
    (g_whole,) = torch.autograd.grad(whole, s_full)
    s_chunk = s_logits.clone().requires_grad_()
    total = 0.0
    for start in range(0, t, 3):
        sl = slice(start, start + 3)
        vals = per_token(s_chunk[:, sl], t_logits[:, sl])
        total = total + aggregate(vals, mask[:, sl], normalizer=n_tokens)
    (g_chunk,) = torch.autograd.grad(total, s_chunk)
    torch.testing.assert_close(total, whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(g_chunk, g_whole, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise():
    a, b = torch.zeros(2, 3), torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"unknown support mode 'full'"):
        support_reverse_kl(a, a, "full")
    with pytest.raises(ValueError, match=r"unknown support mode"):
        support_forward_kl(a, a, "nope")
    with pytest.raises(ValueError, match=r"support size mismatch: student K=3, teacher K=4"):
        support_reverse_kl(a, b)
    with pytest.raises(ValueError, match=r"shape mismatch"):
        support_reverse_kl(torch.zeros(2, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"support_mask shape"):
        support_reverse_kl(a, a, "tail", torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"unknown sampled estimator 'k4'"):
        sampled_kl(a, a, "k4")
    with pytest.raises(ValueError, match=r"shape mismatch"):
        sampled_kl(a, b, "k1")
    with pytest.raises(ValueError, match=r"unknown aggregation 'sum'"):
        aggregate(a, a.bool(), "sum")
    with pytest.raises(ValueError, match=r"same \[B, T\] shape"):
        aggregate(a, b.bool())
    with pytest.raises(ValueError, match=r"normalizer must be > 0"):
        aggregate(a, a.bool(), normalizer=0)
    with pytest.raises(ValueError, match=r"ids shape"):
        gather_logprobs(torch.zeros(2, 5), torch.zeros(3, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        gather_logprobs(torch.zeros(2, 5), torch.zeros(2, 1, dtype=torch.int64), 0.0)
    with pytest.raises(ValueError, match=r"shape mismatch: student ids"):
        merge_support(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(3, 3, dtype=torch.int64))
