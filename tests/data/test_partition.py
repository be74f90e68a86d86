"""opcd.data.partition: every row once, row counts within one, token loads within the longest row,
and the same answer every time (each rank computes it alone)."""

import random

from opcd.data.partition import balanced_rows


def _long_tailed(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [min(16384, int(rng.lognormvariate(7.5, 1.0)) + 1) for _ in range(count)]


def test_partition_covers_every_row_with_balanced_counts_and_loads():
    for seed in range(300):
        rng = random.Random(seed)
        lengths = _long_tailed(seed, rng.randint(1, 80))
        parts = rng.randint(1, 17)
        split = balanced_rows(lengths, parts)
        assert len(split) == parts and sorted(r for rows in split for r in rows) == list(range(len(lengths)))
        assert all(rows == sorted(rows) for rows in split)
        assert max(map(len, split)) - min(map(len, split)) <= 1
        loads = [sum(lengths[r] for r in rows) for rows in split]
        assert max(loads) - min(loads) <= max(lengths)
        assert balanced_rows(lengths, parts) == split  # deterministic


def test_paper_shape_is_within_ten_percent_of_the_mean():
    lengths = _long_tailed(0, 128)  # B=128 responses up to 16,384 tokens, 16 ranks
    loads = [sum(lengths[r] for r in rows) for rows in balanced_rows(lengths, 16)]
    round_robin = [sum(lengths[r::16]) for r in range(16)]
    mean = sum(loads) / 16
    assert max(loads) / mean <= 1.10 < max(round_robin) / mean


def test_hand_case():
    assert balanced_rows([10, 1, 1, 1], 2) == [[0, 3], [1, 2]]  # the long row, then the one that did not fit
    assert balanced_rows([5, 5, 5], 4) == [[0], [1], [2], []]
