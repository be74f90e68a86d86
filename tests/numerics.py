"""Tolerances derived from the computation, not tuned on one CPU.

Two CPUs run the same fp32 reductions in different orders: the ATen kernels block a sum by the SIMD
width (AVX2: 8 lanes, AVX-512: 16), and a chunked lm head runs its matmuls at other shapes than the
unchunked one. A tolerance that passes on one machine's kernels by a factor of two fails on the next.
So each comparison states which reduction it rests on and how the rounding of that reduction grows.
"""

import math

import torch

EPS32 = torch.finfo(torch.float32).eps
# Margin over the typical (probabilistic) bound: the bound is a standard deviation, not a maximum.
SAFETY = 4.0


def reduction_rtol(n_terms: int) -> float:
    """Relative error of an fp32 sum of ``n_terms`` terms of one sign whose summation order changes.

    Rounding errors of a blocked or pairwise sum behave like a random walk: their typical size grows
    as ``sqrt(n) * eps`` (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., §4.2),
    against ``n * eps`` for the worst case, which no real kernel reaches.
    """
    return SAFETY * math.sqrt(n_terms) * EPS32


def softmax_rtol(vocab_size: int) -> float:
    """Log-probs, losses and gradients built on a softmax over the vocabulary: the normaliser is the one
    long reduction (``sum_v exp(z_v)``, terms of one sign), and everything downstream of it inherits
    its relative error; the sums over a top-k support and over tokens are short by comparison."""
    return reduction_rtol(vocab_size)


def entropy_rtol(vocab_size: int, entropy: float) -> float:
    """The entropy is computed as ``log Z - E_p[z]``: two terms of size up to ``ln V`` (for the
    vocabulary's log-probs) whose difference is the entropy, so the subtraction multiplies the
    normaliser's relative error by ``ln V / H``. A sharp distribution (small ``H``) deserves a looser
    check than its loss, which has no such cancellation."""
    return softmax_rtol(vocab_size) * math.log(vocab_size) / max(entropy, 1e-3)
