"""Rank shares of a batch (opcd.protocol): each rank's share holds its rows and nothing else, ids
travel as int32, and a rank planning from its share runs the same micro-batches as one that holds the
whole batch."""

import functools

import torch

from opcd.data.batching import plan_micro_batches
from opcd.protocol import ScoreRequest, UpdateBatch, share_lengths
from opcd.workers.distributed import rank_micro_batches, share_micro_batches


def _batch(rows=7, width=9, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    mask = torch.arange(width)[None] < lengths[:, None]
    prompts = [list(range(int(n))) for n in torch.randint(1, 6, (rows,), generator=g)]
    return UpdateBatch(prompts, torch.randint(0, 1000, (rows, width), generator=g), mask,
                       torch.randint(0, 1000, (rows, width, k), generator=g), None, torch.randn(rows, width, k),
                       int(mask.sum()), rows)


def test_each_share_holds_its_rows_only_with_int32_ids():
    batch = _batch()
    shares = batch.rank_shares(3)
    for rank, share in enumerate(shares):
        rows = list(range(rank, 7, 3))
        assert share.prompt_ids == [batch.prompt_ids[i] for i in rows]
        assert torch.equal(share.teacher_logprobs, batch.teacher_logprobs[rows])
        assert share.support_ids.dtype == torch.int32 and torch.equal(share.support_ids.long(), batch.support_ids[rows])
        assert (share.num_tokens, share.num_sequences) == (batch.num_tokens, batch.num_sequences)  # global normalisers
    assert sum(s.teacher_logprobs.numel() for s in shares) == batch.teacher_logprobs.numel()


def test_share_plan_matches_the_whole_batch_plan():
    batch = _batch(rows=11)
    lengths = share_lengths(batch.prompt_ids, batch.response_mask)
    for size, budget in ((2, 0), (1, 0), (8, 12)):
        plan = functools.partial(plan_micro_batches, lengths=lengths, size=size, token_budget=budget)
        for world in (1, 2, 3, 16):
            for rank, share in enumerate(batch.rank_shares(world)):
                whole, steps = rank_micro_batches(11, rank, world, plan)
                local, local_steps = share_micro_batches(share.share, size, budget)
                assert local_steps == steps
                assert [[share.share.rows[i] for i in micro] for micro in local] == whole


def test_an_empty_share_runs_on_one_token():
    batch = _batch(rows=1)
    idle = batch.rank_shares(2)[1]
    assert idle.prompt_ids == [] and idle.teacher_logprobs.shape[0] == 0
    filler = idle.one_token()
    assert filler.response_ids.shape == (1, 1) and filler.support_ids.shape == (1, 1, 4)
    assert share_micro_batches(filler.share, 1, 0) == ([], 1)  # one pass, no row of its own
    request = ScoreRequest(batch.prompt_ids, batch.response_ids, batch.response_mask, None).rank_shares(2)[1]
    assert request.one_token().response_mask.tolist() == [[True]]
