"""Counter-based random draws on the device: the random number of (prompt seed, decoding position) is a
hash of those two numbers, not the next value of a stateful generator.

So a prompt's sampled tokens depend on its own seed and nothing else (not on the rows beside it in
the batch, nor on the rank that generates it), and a decoding step draws for the whole batch in a few
tensor operations where the logits already are: no Python loop over per-row generators, no
host-to-device copy (and so no device synchronisation) per token.

The hash is a 32-bit avalanche mix (multiply-xorshift rounds) on int32 tensors: their products wrap
modulo 2**32 (two's complement, as CUDA and the CPU's vector units compute them; a test checks it
against exact modular arithmetic), and right shifts are made logical by masking the sign extension.
Sampling inverts one uniform per row through the row's CDF. Gumbel-max over a hash per (row, token)
was measured too: exact as well, but its [B, V] integer work made a CPU decoding step's sampling
2-3x slower than the inversion.
"""

from __future__ import annotations

import torch

_POSITION_SALT = 0x9E3779B9  # keeps position 0 of one seed from colliding with a small seed's hash


def _int32(value: int) -> int:
    """A 32-bit pattern as the int32 that holds it."""
    value &= 0xFFFFFFFF
    return value - 2**32 if value >= 2**31 else value


_M1, _M2 = _int32(0x7FEB352D), _int32(0x846CA68B)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int32 bit patterns."""
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche, elementwise on int32 bit patterns."""
    x = x ^ _shr(x, 16)
    x = x * _M1
    x = x ^ _shr(x, 15)
    x = x * _M2
    return x ^ _shr(x, 16)


def row_keys(seeds: torch.Tensor, position: int) -> torch.Tensor:
    """[B] int64 seeds (any 64-bit value) and a decoding position -> [B] int32 keys."""
    low = (seeds & 0xFFFFFFFF).to(torch.int64)
    low = torch.where(low >= 2**31, low - 2**32, low).to(torch.int32)
    high = ((seeds >> 32) & 0xFFFFFFFF)
    high = torch.where(high >= 2**31, high - 2**32, high).to(torch.int32)
    salt = mix32(torch.full_like(low, _int32(position + _POSITION_SALT)))
    return mix32(low ^ mix32(high ^ salt))


def row_uniforms(seeds: torch.Tensor, position: int) -> torch.Tensor:
    """[B] int64 seeds and a decoding position -> [B] float64 uniforms in the open interval (0, 1)."""
    bits = row_keys(seeds, position).to(torch.int64) & 0xFFFFFFFF
    return (bits.to(torch.float64) + 0.5) * (1.0 / 2**32)


def inverse_cdf_sample(logits: torch.Tensor, seeds: torch.Tensor, position: int) -> torch.Tensor:
    """One draw per row from softmax(logits) ([B, V], -inf excluded), keyed by (seed, position): [B] ids.

    One uniform per row, inverted through the row's cumulative distribution (float64: over 150k
    tokens a float32 running sum drifts by more than the tail tokens' mass). A token of probability 0
    has a zero-width interval and is never chosen."""
    probs = torch.softmax(logits.float(), dim=-1).double()
    cdf = probs.cumsum(-1)
    cdf = cdf / cdf[:, -1:]
    u = row_uniforms(seeds.to(logits.device), position).unsqueeze(-1)
    return torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1).squeeze(-1)
