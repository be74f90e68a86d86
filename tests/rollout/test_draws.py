"""Counter-based draws (opcd/rollout/draws.py): the hash, the uniforms and Gumbel-max sampling."""

import math

import torch

from opcd.rollout.draws import _M1, _M2, _int32, _shr, inverse_cdf_sample, mix32, row_uniforms


def test_int32_products_wrap_like_exact_modular_products():
    """The hash relies on int32 multiplication wrapping modulo 2**32 (two's complement) on this
    machine's kernels; checked against Python's exact integers over the whole range."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2**31, 2**31, (5_000,), generator=g, dtype=torch.int64)
    for constant in (_M1, _M2, -1, 1, 2**31 - 1):
        got = (x.to(torch.int32) * constant).to(torch.int64)
        exact = torch.tensor([_int32(int(v) * constant) for v in x])
        assert torch.equal(got, exact), constant
    assert torch.equal(_shr(torch.tensor([-1], dtype=torch.int32), 16), torch.tensor([0xFFFF], dtype=torch.int32))


def test_the_hash_avalanches():
    """Flipping one input bit flips about half of the output bits (a weak hash would sample correlated tokens)."""
    x = (torch.arange(4096, dtype=torch.int64) * 7919).to(torch.int32)
    flips = []
    for bit in range(32):
        diff = mix32(x) ^ mix32(x ^ _int32(1 << bit))
        flips.append(sum(int((_shr(diff, b) & 1).sum()) if b else int((diff & 1).sum()) for b in range(32))
                     / (32 * len(x)))
    assert all(0.45 < f < 0.55 for f in flips), flips


def test_row_uniforms_are_uniform_open_and_keyed():
    u = torch.stack([row_uniforms(torch.arange(256, dtype=torch.int64) + 2**40, position=t) for t in range(64)])
    assert u.dtype == torch.float64 and float(u.min()) > 0 and float(u.max()) < 1
    counts = torch.histc(u.float(), bins=16, min=0, max=1)
    expected = u.numel() / 16
    assert float(((counts - expected) ** 2 / expected).sum()) < 45  # chi-square, 15 dof: p ~ 1e-4
    seed = torch.tensor([5])
    assert not torch.equal(row_uniforms(seed, 3), row_uniforms(seed, 4))
    assert torch.equal(row_uniforms(seed, 3), row_uniforms(seed, 3))
    assert not torch.equal(row_uniforms(torch.tensor([5]), 3), row_uniforms(torch.tensor([5 + 2**32]), 3))


def test_draws_follow_the_softmax_and_never_pick_a_cut_token():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -float("inf")]).expand(40_000, 5)
    seeds = torch.arange(40_000, dtype=torch.int64) * 1_000_003 + 2**40  # seeds beyond 32 bits
    chosen = inverse_cdf_sample(logits, seeds, position=0)
    frequencies = torch.bincount(chosen, minlength=5).float() / 40_000
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0]), -1)
    torch.testing.assert_close(frequencies[:4], expected, atol=0.01, rtol=0)
    assert frequencies[4] == 0


def test_one_seeds_positions_are_independent_draws():
    """A single prompt's stream over 20,000 positions: the frequencies match too (no period, no drift)."""
    logits = torch.tensor([[0.0, math.log(3.0)]])
    seed = torch.tensor([123456789], dtype=torch.int64)
    draws = torch.stack([inverse_cdf_sample(logits, seed, t) for t in range(20_000)]).flatten()
    assert abs(float(draws.float().mean()) - 0.75) < 0.012
    runs = int((draws[1:] != draws[:-1]).sum())  # a Markov dependence would change the switch rate
    assert abs(runs / 19_999 - 2 * 0.75 * 0.25) < 0.015
