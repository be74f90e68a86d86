"""Turning vLLM's flat log-probs into top-k ids (opcd.rollout.vllm.topk_ids): a pure function, tested
on hand-built inputs with the layout of vLLM's FlatLogprobs (no vLLM needed)."""

from types import SimpleNamespace

import torch

from opcd.rollout.vllm import topk_ids


def _flat(positions: list[list[tuple[int, int | None]]]) -> SimpleNamespace:
    """[(token, rank), ...] per position -> FlatLogprobs' start/end indices and flat lists."""
    flat = SimpleNamespace(start_indices=[], end_indices=[], token_ids=[], ranks=[])
    for entries in positions:
        flat.start_indices.append(len(flat.token_ids))
        for token, rank in entries:
            flat.token_ids.append(token)
            flat.ranks.append(rank)
        flat.end_indices.append(len(flat.token_ids))
    return flat


def test_k_best_ids_in_rank_order_whatever_the_entry_order():
    flat = _flat([
        [(7, 3), (5, 1), (9, 2), (7, 3)],      # the sampled token first, and again among the k best
        [(100, 50), (8, 3), (4, 1), (2, 2)],   # the sampled token ranked outside the k best
        [(11, 1), (12, 2)],                    # fewer than k ranked entries: the best one repeats
        [],                                    # none at all
    ])
    assert topk_ids(flat, 4, 3).tolist() == [[5, 9, 7], [4, 2, 8], [11, 12, 11], [0, 0, 0]]


def test_unranked_entries_and_empty_requests():
    flat = _flat([[(3, None), (6, 1)]])
    assert topk_ids(flat, 1, 1).tolist() == [[6]]
    assert topk_ids(_flat([]), 0, 4).shape == (0, 4)
    assert topk_ids(_flat([]), 2, 4).tolist() == [[0] * 4, [0] * 4]
    assert topk_ids(flat, 1, 1).dtype == torch.long
