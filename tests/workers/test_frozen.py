"""The teacher (frozen-model) worker in process: its log-probs at a support equal a brute-force full
forward of each row alone, merged supports, full-vocabulary scoring, chunked head and packing parity."""

import pytest
import torch

from opcd.protocol import SamplingParams, UpdateBatch

from tests.workers.common import (  # noqa: F401 (fixtures are registered by importing them)
    _logprobs_alone, _random_responses, _student, _teacher, one_thread, prompts, teacher_prompts, tiny_lm, tokenizer)


def test_teacher_scores_equal_brute_force(sharp_tiny_deeper_model, teacher_prompts):
    teacher = _teacher(sharp_tiny_deeper_model, temperature=0.7, micro_batch_size=3)  # two micro-batches
    lengths = [5, 2, 6, 1]
    response_ids, response_mask = _random_responses(lengths, 6, teacher.pad_id)
    support = torch.randint(0, 49152, (4, 6, 5), generator=torch.Generator().manual_seed(1))
    scores = teacher.score(teacher_prompts, response_ids, response_mask, support)
    assert torch.equal(scores.support_ids, support) and scores.support_mask is None
    entropies = []
    for row, n in enumerate(lengths):
        logp = _logprobs_alone(teacher.model, teacher_prompts[row], response_ids[row, :n].tolist(), 0.7)
        torch.testing.assert_close(scores.logprobs[row, :n].double(), logp.gather(-1, support[row, :n]),
                                   atol=1e-5, rtol=0)
        entropy = -(logp.exp() * logp).sum(-1)
        # float32 over 49k terms (logits ~20 after /T): ~3e-5 off near-deterministic positions
        torch.testing.assert_close(scores.entropy[row, :n].double(), entropy, atol=1e-4, rtol=0)
        entropies.extend(entropy.tolist())
    assert max(entropies) > 1.0 and min(entropies) < 0.1  # both spread and peaked positions were checked


def test_teacher_merged_support_is_the_union_without_duplicates(sharp_tiny_deeper_model, teacher_prompts):
    teacher = _teacher(sharp_tiny_deeper_model, temperature=1.0, micro_batch_size=2)
    lengths = [4, 3, 4, 2]
    response_ids, response_mask = _random_responses(lengths, 4, teacher.pad_id, seed=2)
    brute = [_logprobs_alone(teacher.model, teacher_prompts[r], response_ids[r, :n].tolist(), 1.0)
             for r, n in enumerate(lengths)]
    support = torch.randint(0, 49152, (4, 4, 6), generator=torch.Generator().manual_seed(3))
    for row, n in enumerate(lengths):  # force overlaps: the teacher's own top-2 are in the student support
        support[row, :n, :2] = brute[row].topk(2, dim=-1).indices
    scores = teacher.score(teacher_prompts, response_ids, response_mask, support, merge_topk=4)
    assert scores.support_ids.shape == (4, 4, 10) and scores.support_mask.shape == (4, 4, 10)
    for row, n in enumerate(lengths):
        teacher_top = brute[row].topk(4, dim=-1).indices
        for t in range(n):
            kept = scores.support_ids[row, t][scores.support_mask[row, t]].tolist()
            assert len(kept) == len(set(kept))  # every token counted once
            assert set(kept) == set(support[row, t].tolist()) | set(teacher_top[t].tolist())
            assert not scores.support_mask[row, t].all()  # the forced overlaps were masked
        expected = brute[row].gather(-1, scores.support_ids[row, :n])
        torch.testing.assert_close(scores.logprobs[row, :n].double(), expected, atol=1e-5, rtol=0)


def test_teacher_full_vocabulary_support_is_normalised(sharp_tiny_deeper_model, teacher_prompts):
    teacher = _teacher(sharp_tiny_deeper_model, temperature=1.3)
    response_ids, response_mask = _random_responses([3, 1], 3, teacher.pad_id)
    scores = teacher.score(teacher_prompts[:2], response_ids, response_mask, None)
    assert scores.logprobs.shape == (2, 3, 49152)
    mask = response_mask
    torch.testing.assert_close(scores.logprobs[mask].logsumexp(-1), torch.zeros(int(mask.sum())), atol=1e-5, rtol=0)


@pytest.mark.parametrize("support,merge_topk", [("student", 0), ("student", 4), (None, 0)])
def test_chunked_head_teacher_scores_equal_full_logits(sharp_tiny_deeper_model, teacher_prompts, support,
                                                       merge_topk):
    chunked = _teacher(sharp_tiny_deeper_model, temperature=0.9, micro_batch_size=3, lm_head_chunk_size=4)
    full = _teacher(sharp_tiny_deeper_model, temperature=0.9, micro_batch_size=3, lm_head_chunk_size=0)
    response_ids, response_mask = _random_responses([5, 2, 6, 1], 6, full.pad_id)
    ids = None if support is None else torch.randint(0, 49152, (4, 6, 5), generator=torch.Generator().manual_seed(4))
    a = chunked.score(teacher_prompts, response_ids, response_mask, ids, merge_topk)
    b = full.score(teacher_prompts, response_ids, response_mask, ids, merge_topk)
    assert torch.equal(a.support_ids[response_mask], b.support_ids[response_mask])
    assert (a.support_mask is None) == (b.support_mask is None)
    if a.support_mask is not None:
        assert torch.equal(a.support_mask[response_mask], b.support_mask[response_mask])
    torch.testing.assert_close(a.logprobs[response_mask], b.logprobs[response_mask], atol=5e-6, rtol=0)
    torch.testing.assert_close(a.entropy[response_mask], b.entropy[response_mask], atol=5e-5, rtol=0)


def test_models_that_transform_their_logits_keep_the_full_logits_path(tmp_path):
    """Gemma-2 soft-caps its logits after the lm_head: hidden @ W.T is not its logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    from opcd.workers.lm_head import is_plain_head

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8)
    torch.manual_seed(0)
    assert is_plain_head(LlamaForCausalLM(LlamaConfig(**small)))
    gemma = Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=0.5))
    assert not is_plain_head(gemma)


def test_packed_teacher_scores_equal_padded(sharp_tiny_deeper_model, teacher_prompts):
    packed = _teacher(sharp_tiny_deeper_model, temperature=0.9, micro_batch_size=3, padding_free=True)
    padded = _teacher(sharp_tiny_deeper_model, temperature=0.9, micro_batch_size=3, padding_free=False)
    response_ids, response_mask = _random_responses([5, 2, 6, 1], 6, padded.pad_id)
    support = torch.randint(0, 49152, (4, 6, 5), generator=torch.Generator().manual_seed(4))
    a = packed.score(teacher_prompts, response_ids, response_mask, support, merge_topk=3)
    b = padded.score(teacher_prompts, response_ids, response_mask, support, merge_topk=3)
    assert torch.equal(a.support_ids[response_mask], b.support_ids[response_mask])
    assert torch.equal(a.support_mask[response_mask], b.support_mask[response_mask])
    torch.testing.assert_close(a.logprobs[response_mask], b.logprobs[response_mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(a.entropy[response_mask], b.entropy[response_mask], atol=5e-5, rtol=0)
    assert torch.isfinite(a.logprobs).all()  # past the responses' ends too: the trainer checks them


def test_the_teacher_scores_to_its_own_token_budget(sharp_tiny_deeper_model, teacher_prompts):
    """trainer.teacher_micro_batch_tokens: the teacher takes fewer, larger passes than the student's
    micro-batching (one row per pass here) and scores the same."""
    own = _teacher(sharp_tiny_deeper_model, micro_batch_size=1, teacher_micro_batch_tokens=10_000)
    student_like = _teacher(sharp_tiny_deeper_model, micro_batch_size=1)
    passes = {}
    for name, worker in (("own", own), ("student_like", student_like)):
        passes[name] = 0
        worker.model.model.register_forward_hook(lambda *_, _name=name: passes.__setitem__(_name, passes[_name] + 1))
    response_ids, response_mask = _random_responses([5, 2, 6, 1], 6, own.pad_id)
    support = torch.randint(0, 49152, (4, 6, 5), generator=torch.Generator().manual_seed(4))
    a = own.score(teacher_prompts, response_ids, response_mask, support)
    b = student_like.score(teacher_prompts, response_ids, response_mask, support)
    assert passes == {"own": 1, "student_like": 4}
    torch.testing.assert_close(a.logprobs[response_mask], b.logprobs[response_mask], atol=1e-5, rtol=0)


# -- a teacher with more embedding rows than the student (same tokenizer) ----------------------------

STUDENT_ROWS = 49152


@pytest.mark.parametrize("chunk", [0, 4])
@pytest.mark.parametrize("support,merge_topk", [("student", 0), ("student", 4), (None, 0)])
def test_padded_teacher_scores_are_renormalised_over_the_students_rows(tiny_padded_teacher, teacher_prompts, chunk,
                                                                       support, merge_topk):
    """Regression: a teacher of 49,216 rows scored over all its rows (and was refused at start-up); its
    softmax is now over the student's 49,152 ids, so full-vocabulary and merged supports fit the student."""
    teacher = _teacher(tiny_padded_teacher, temperature=0.8, lm_head_chunk_size=chunk, vocab_rows=STUDENT_ROWS)
    assert teacher.model.get_output_embeddings().weight.shape[0] == STUDENT_ROWS + 64
    lengths = [3, 1]
    response_ids, response_mask = _random_responses(lengths, 3, teacher.pad_id, seed=5)
    generator = torch.Generator().manual_seed(6)
    ids = None if support is None else torch.randint(0, STUDENT_ROWS, (2, 3, 5), generator=generator)
    scores = teacher.score(teacher_prompts[:2], response_ids, response_mask, ids, merge_topk)
    assert int(scores.support_ids[response_mask].max()) < STUDENT_ROWS
    if support is None:
        assert scores.logprobs.shape == (2, 3, STUDENT_ROWS)
    for row, n in enumerate(lengths):
        with torch.no_grad():
            prompt = teacher_prompts[row]
            logits = teacher.model(input_ids=torch.tensor([prompt + response_ids[row, :n].tolist()])).logits[0].double()
        logp = torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + n, :STUDENT_ROWS] / 0.8, dim=-1)
        torch.testing.assert_close(scores.logprobs[row, :n].double(), logp.gather(-1, scores.support_ids[row, :n]),
                                   atol=1e-5, rtol=0)


def test_padded_teacher_trains_a_student_in_full_vocabulary_mode(tiny_model, tiny_padded_teacher, prompts,
                                                                  teacher_prompts):
    """The exact-KL mode (loss.kl_topk <= 0): the student reads the teacher's log-probs at all its own ids."""
    student = _student(tiny_model, micro_batch_size=4)
    teacher = _teacher(tiny_padded_teacher, vocab_rows=STUDENT_ROWS)
    gen = student.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=3), 0)
    scores = teacher.score(teacher_prompts, gen.response_ids, gen.response_mask, None)
    stats = student.update(UpdateBatch(
        prompt_ids=prompts, response_ids=gen.response_ids, response_mask=gen.response_mask,
        support_ids=scores.support_ids, support_mask=scores.support_mask, teacher_logprobs=scores.logprobs,
        num_tokens=int(gen.response_mask.sum()), num_sequences=len(prompts)))
    assert stats["loss"] > 0 and torch.isfinite(torch.tensor(stats["loss"]))


def test_teacher_refuses_vocab_rows_beyond_its_own(tiny_model):
    with pytest.raises(ValueError, match=r"vocab_rows 50000 must be in \[1, 49152\]"):
        _teacher(tiny_model, vocab_rows=50000)


def test_rank_shares_are_put_back_in_batch_order():
    """Rank r of N scores rows r, r + N, ...; `WorkerGroup.gather` hands the shares of the ranks that had
    rows to `TeacherScores.from_rank_shares`. 5 rows on 3 ranks: rows (0, 3), (1, 4), (2,)."""
    from opcd.protocol import TeacherScores

    rows = torch.arange(5, dtype=torch.float32)

    def share(index):
        r = rows[index]
        return TeacherScores(logprobs=r.view(-1, 1, 1).expand(-1, 2, 3), entropy=r.view(-1, 1).expand(-1, 2),
                             support_ids=r.long().view(-1, 1, 1).expand(-1, 2, 3))
    merged = TeacherScores.from_rank_shares([share([0, 3]), share([1, 4]), share([2])])
    assert torch.equal(merged.logprobs[:, 0, 0], rows) and torch.equal(merged.entropy[:, 1], rows)
    assert torch.equal(merged.support_ids[:, 1, 2], rows.long()) and merged.support_mask is None
    alone = share([0, 1, 2, 3, 4])
    assert TeacherScores.from_rank_shares([alone]) is not None
    assert torch.equal(TeacherScores.from_rank_shares([alone]).logprobs, alone.logprobs)
