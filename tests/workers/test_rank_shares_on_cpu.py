"""Through real Ray actors and the real WorkerGroup: with 2 ranks each rank receives its rows only,
packed (no padding), and the ranks' rows together are the batch; with scatter off (the old data
plane) each received the whole padded batch. Measured on the receiving side."""

from __future__ import annotations

import torch

from opcd.protocol import Generation, SamplingParams, UpdateBatch
from opcd.workers.group import WorkerGroup


class Receiver:
    """A rank that reports what reached it."""

    def __init__(self, rank: int = 0, world_size: int = 1, rendezvous=None):
        self.rank = rank

    def update(self, batch: UpdateBatch) -> dict:
        tensors = (batch.response_ids, batch.response_mask, batch.support_ids, batch.teacher_logprobs)
        whole = batch.unpacked()
        return {"bytes": sum(t.numel() * t.element_size() for t in tensors), "prompts": batch.prompt_ids,
                "logprob_rows": batch.teacher_logprobs.shape[0], "logprobs": whole.teacher_logprobs,
                "rows": None if batch.share is None else batch.share.rows}


def _batch() -> UpdateBatch:
    lengths = torch.tensor([40, 3, 7, 1, 25])
    mask = torch.arange(40)[None] < lengths[:, None]
    g = torch.Generator().manual_seed(0)
    return UpdateBatch([[i] for i in range(5)], torch.randint(1, 9, (5, 40), generator=g).masked_fill(~mask, 0),
                       mask, torch.randint(0, 99, (5, 40, 8), generator=g), None, torch.randn(5, 40, 8, generator=g),
                       int(mask.sum()), 5)


def test_each_rank_receives_its_rows_only(local_ray):
    batch = _batch()
    group = WorkerGroup("receivers", Receiver, {}, world_size=2, num_cpus=0.01)
    try:
        got = group.call(Receiver.update, batch)
        group.scatter = False
        old = group.call(Receiver.update, batch)
    finally:
        group.shutdown()
    assert sorted(r for g in got for r in g["rows"]) == list(range(5))
    real = batch.num_tokens * (8 * (4 + 4) + 4)  # per real token: K int32 ids + K fp32 log-probs, its int32 id
    for g in got:
        assert g["prompts"] == [[r] for r in g["rows"]]
        mask = batch.response_mask[g["rows"]]
        assert g["logprob_rows"] == int(mask.sum())  # packed: real tokens only
        assert torch.equal(g["logprobs"][mask], batch.teacher_logprobs[g["rows"]][mask])
    assert sum(g["bytes"] for g in got) < 1.1 * real  # together about one copy of the real payload
    # the old plane: every rank got the whole padded batch, int64 ids
    assert all(o["rows"] is None and o["logprob_rows"] == 5 for o in old)
    assert min(o["bytes"] for o in old) > 2 * real


class Engine:
    """A rank of a tensor-parallel engine: answers its prompts' first tokens, and records what reached it."""

    def __init__(self, rank: int = 0, world_size: int = 1, rendezvous=None):
        self.seen = None

    def generate(self, prompts, params, seed, reply=True, packed=False):
        self.seen = (prompts, seed, reply)
        ids = torch.tensor([[p[0], 7] for p in prompts], dtype=torch.long).reshape(len(prompts), 2)
        mask = torch.tensor([[True, len(p) > 1] for p in prompts], dtype=torch.bool).reshape(len(prompts), 2)
        generation = Generation(ids.masked_fill(~mask, 0), mask, ids[..., None].expand(-1, -1, 3) + 1)
        assert packed  # the group asks for the packed answer
        return generation.packed(pad_id=0) if reply else None


def test_a_tensor_parallel_engine_gets_one_share_and_only_its_first_rank_answers(local_ray):
    """4 ranks as 2 engines of 2: both ranks of an engine see the same prompts and seed (vLLM's
    external launcher runs them in lockstep); only ranks 0 and 2 are asked for a reply."""
    group = WorkerGroup("engines", Engine, {}, world_size=4, num_cpus=0.01, ranks_per_engine=2)
    group._pad_id = 0
    try:
        out = group.generate([[10], [11, 1], [12]], SamplingParams(), seed=5)
        seen = group.call("__ray_call__", lambda worker: worker.seen)
    finally:
        group.shutdown()
    assert out.response_ids.tolist() == [[10, 0], [11, 7], [12, 0]] and out.response_ids.dtype == torch.long
    assert out.topk_ids[:, :, 0].tolist() == [[11, 0], [12, 8], [13, 0]] and out.topk_ids.dtype == torch.long
    assert [s[0] for s in seen] == [[[10], [11, 1]], [[10], [11, 1]], [[12]], [[12]]]
    assert seen[0][1] == seen[1][1] and seen[2][1] == seen[3][1] != seen[0][1]
    assert [s[2] for s in seen] == [True, False, True, False]
