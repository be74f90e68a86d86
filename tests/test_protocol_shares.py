"""Rank shares of a batch (opcd.protocol): each rank's share holds its rows and nothing else, ids
travel as int32, and a rank planning from its share runs the same micro-batches as one that holds the
whole batch."""

import pytest
import torch

from opcd.data.batching import plan_micro_batches
from opcd.data.partition import balanced_rows
from opcd.protocol import ScoreRequest, TeacherScores, UpdateBatch, pack_tokens, share_lengths, unpack_tokens
from opcd.workers.distributed import share_micro_batches


def _batch(rows=7, width=9, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    mask = torch.arange(width)[None] < lengths[:, None]
    prompts = [list(range(int(n))) for n in torch.randint(1, 6, (rows,), generator=g)]
    responses = torch.randint(0, 1000, (rows, width), generator=g).masked_fill(~mask, 7)  # pad id 7
    return UpdateBatch(prompts, responses, mask,
                       torch.randint(0, 1000, (rows, width, k), generator=g), None, torch.randn(rows, width, k),
                       int(mask.sum()), rows)


def test_each_share_holds_its_real_tokens_only_with_int32_ids():
    batch = _batch()
    shares = batch.rank_shares(3)
    for rank, share in enumerate(shares):
        rows = share.share.rows
        mask = batch.response_mask[rows]
        assert share.prompt_ids == [batch.prompt_ids[i] for i in rows]
        assert share.support_ids.dtype == torch.int32 and share.support_ids.shape == (int(mask.sum()), 4)
        assert (share.num_tokens, share.num_sequences) == (batch.num_tokens, batch.num_sequences)  # global normalisers
        whole = share.unpacked()  # what the rank's loss sees: the rows, padded again, zero at the padding
        assert whole.support_ids.dtype == torch.long and torch.equal(whole.response_ids, batch.response_ids[rows])
        assert torch.equal(whole.support_ids[mask], batch.support_ids[rows][mask])
        assert torch.equal(whole.teacher_logprobs[mask], batch.teacher_logprobs[rows][mask])
        assert not whole.teacher_logprobs[~mask].any()
    assert sorted(r for share in shares for r in share.share.rows) == list(range(7))
    # together the shares hold each real token's log-probs once, and no padding
    assert sum(s.teacher_logprobs.shape[0] for s in shares) == batch.num_tokens


def test_pack_round_trip():
    mask = torch.tensor([[True, True, False], [False, False, False], [True, True, True]])
    values = torch.arange(18.).reshape(3, 3, 2)
    packed = pack_tokens(values, mask)
    assert packed.tolist() == [[0., 1.], [2., 3.], [12., 13.], [14., 15.], [16., 17.]]
    assert torch.equal(unpack_tokens(packed, mask), values * mask[..., None])


def test_share_plan_is_the_plan_of_its_rows_and_passes_match_the_busiest_rank():
    batch = _batch(rows=11)
    lengths = share_lengths(batch.prompt_ids, batch.response_mask)
    for size, budget, padded in ((2, 0, False), (1, 0, False), (8, 12, False), (8, 12, True)):
        for world in (1, 2, 3, 16):
            shares = batch.rank_shares(world)
            assignment = balanced_rows(lengths, world)
            plans = [plan_micro_batches(rows, lengths, size, budget, padded) for rows in assignment]
            for rank, share in enumerate(shares):
                assert share.share.rows == assignment[rank] and len(share.prompt_ids) == len(assignment[rank])
                local, passes = share_micro_batches(share.share, size, budget, padded)
                assert passes == max(1, max(map(len, plans)))  # every rank runs the same number of passes
                assert [[share.share.rows[i] for i in micro] for micro in local] == plans[rank]


def test_teacher_answers_go_back_in_the_batch_order():
    batch = _batch(rows=9)
    answers = [TeacherScores(logprobs=s.unpacked().teacher_logprobs, entropy=s.response_mask.float(),
                             support_ids=None).packed(s.response_mask, s.share.rows)
               for s in batch.rank_shares(4)]
    merged = TeacherScores.from_rank_shares(answers)
    assert torch.equal(merged.logprobs, batch.teacher_logprobs * batch.response_mask[..., None])
    assert torch.equal(merged.entropy, batch.response_mask.float())
    assert merged.support_ids is None


def test_a_teachers_packed_answer_holds_real_tokens_only_and_unpacks_exactly():
    """What a rank sends back: [real tokens, K] log-probs, [real tokens] entropy, merged ids as int32;
    the driver gets exactly the padded answer the rank computed (its real positions)."""
    batch = _batch(rows=7)
    for share in batch.rank_shares(3):
        whole = share.unpacked()
        mask = whole.response_mask
        ids = whole.support_ids + 1
        answer = TeacherScores(logprobs=whole.teacher_logprobs, entropy=torch.rand(mask.shape), support_ids=ids,
                               support_mask=torch.ones(ids.shape, dtype=torch.bool))
        sent = answer.packed(mask, share.share.rows)
        real = int(mask.sum())
        assert sent.logprobs.shape == (real, ids.shape[-1]) and sent.entropy.shape == (real,)
        assert sent.support_ids.dtype == torch.int32 and sent.support_mask.shape == (real, ids.shape[-1])
        back = sent.unpacked()
        assert back.support_ids.dtype == torch.long and back.rows == share.share.rows
        for name in ("logprobs", "entropy", "support_ids", "support_mask"):
            assert torch.equal(getattr(back, name)[mask], getattr(answer, name)[mask]), name
            assert not getattr(back, name)[~mask].any(), name  # padding comes back as 0 / False


def test_teacher_scores_are_built_by_keyword():
    with pytest.raises(TypeError):
        TeacherScores(torch.zeros(1, 1, 1), torch.zeros(1, 1), None)  # noqa: the point of the test


def test_an_empty_share_runs_on_one_token():
    batch = _batch(rows=1)
    idle = batch.rank_shares(2)[1]
    assert idle.prompt_ids == [] and idle.teacher_logprobs.shape[0] == 0
    filler = idle.one_token()
    assert filler.unpacked().response_ids.shape == (1, 1) and filler.unpacked().support_ids.shape == (1, 1, 4)
    assert share_micro_batches(filler.share, 1, 0, padded=False) == ([], 1)  # one pass, no row of its own
    request = ScoreRequest(batch.prompt_ids, batch.response_ids, batch.response_mask, None).rank_shares(2)[1]
    assert request.one_token().response_mask.tolist() == [[True]]
    request = ScoreRequest(batch.prompt_ids, batch.response_ids, batch.response_mask, batch.support_ids)
    assert request.rank_shares(2)[1].one_token().unpacked().support_ids.shape == (1, 1, 4)


def test_a_generation_travels_packed_and_unpacks_exactly():
    """A rank's generation on its way back: real tokens only (int32 ids, [n, k] top-k); unpacked, the
    ids are padded with the pad id, the top-k with 0, the loss mask with False."""
    from opcd.protocol import Generation

    mask = torch.tensor([[True, True, False], [True, False, False]])
    ids = torch.tensor([[5, 6, 2], [7, 2, 2]])
    topk = torch.arange(18).view(2, 3, 3)
    loss = torch.tensor([[False, True, False], [True, False, False]])
    sent = Generation(ids, mask, topk, loss).packed(pad_id=2)
    assert sent.response_ids.tolist() == [5, 6, 7] and sent.response_ids.dtype == torch.int32
    assert sent.topk_ids.shape == (3, 3) and sent.loss_mask.tolist() == [False, True, True]
    back = sent.unpacked()
    assert torch.equal(back.response_ids, ids) and back.response_ids.dtype == torch.long
    assert torch.equal(back.topk_ids, topk.masked_fill(~mask[..., None], 0)) and torch.equal(back.loss_mask, loss)
    assert back.pad_id is None and Generation(ids, mask).unpacked().response_ids is ids
