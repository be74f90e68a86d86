"""In-process tests of the hf rollout engine and the student/teacher workers (plain classes, no Ray),
on tiny random models that share the real SmolLM2 tokenizer. Loss-level checks use the `sharp_*`
variants (peaked distributions, so a KL is far from rounding noise)."""

import pytest
import torch

from opcd.batching import plan_micro_batches, prompt_response_inputs, strip_after_eos
from opcd.models import load_causal_lm, load_tokenizer
from opcd.prompts import encode_chat
from opcd.protocol import SamplingParams, UpdateBatch
from opcd.rollout.hf import HFRollout
from opcd.workers.student import StudentWorker
from opcd.workers.teacher import TeacherWorker

QUESTIONS = ["What is the capital of France?", "Hi", "Name three colours of the rainbow, please.", "2+2?"]
SYSTEM = "Always answer in French."
GREEDY = SamplingParams(temperature=0, max_new_tokens=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The workers set torch's global thread count. One thread is fastest for these tiny models (measured:
    a tiny-model generate took 0.1 s on 1 thread, 0.7-2 s on 2 threads of a busy 2-core machine); the
    previous count is restored for the other test modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Student prompts of different lengths (so the batch is left-padded)."""
    return [encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def teacher_prompts(tokenizer):
    return [encode_chat(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
            for q in QUESTIONS]


@pytest.fixture(scope="module")
def tiny_lm(tiny_model):
    return load_causal_lm(str(tiny_model)).eval()


def _student(path, **kwargs) -> StudentWorker:
    return StudentWorker(str(path), num_threads=1, **kwargs)


def _teacher(path, **kwargs) -> TeacherWorker:
    return TeacherWorker(str(path), num_threads=1, **kwargs)


def _update_batch(student, teacher, prompts, teacher_prompts, *, k=8, max_new_tokens=6, seed=0,
                  lengths=None) -> UpdateBatch:
    """Roll out with the student, optionally cut responses to `lengths`, score with the teacher."""
    gen = student.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens,
                                                   record_topk=k), seed)
    ids, mask = gen.response_ids.clone(), gen.response_mask.clone()
    if lengths is not None:
        for row, length in enumerate(lengths):
            mask[row, length:] = False
        ids = ids.masked_fill(~mask, student.pad_id)
    scores = teacher.score(teacher_prompts, ids, mask, gen.topk_ids, 0)
    return UpdateBatch(prompt_ids=prompts, response_ids=ids, response_mask=mask, support_ids=scores.support_ids,
                       support_mask=scores.support_mask, teacher_logprobs=scores.logprobs,
                       num_tokens=int(mask.sum()), num_sequences=len(prompts))


def _assert_same_weights(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def _max_weight_change(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


# -- HFRollout -------------------------------------------------------------------------------------

def test_greedy_batch_equals_generate_on_each_prompt_alone(tiny_lm, tokenizer, prompts):
    """Left padding inside the batch must not change any row's greedy continuation."""
    gen = HFRollout(tiny_lm, tokenizer).generate(prompts, GREEDY, seed=0)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            out = tiny_lm.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   do_sample=False, max_new_tokens=GREEDY.max_new_tokens,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        alone, alone_mask = strip_after_eos(out[:, len(prompt):], {tokenizer.eos_token_id}, tokenizer.pad_token_id)
        n = int(alone_mask.sum())
        assert gen.response_ids[row, :n].tolist() == alone[0, :n].tolist()
        assert int(gen.response_mask[row].sum()) == n


def test_sampling_is_reproducible_per_seed(tiny_lm, tokenizer, prompts):
    rollout = HFRollout(tiny_lm, tokenizer)
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    first = rollout.generate(prompts, params, seed=7)
    torch.manual_seed(12345)  # the global RNG state before the call must not matter
    again = rollout.generate(prompts, params, seed=7)
    other = rollout.generate(prompts, params, seed=8)
    assert torch.equal(first.response_ids, again.response_ids)
    assert torch.equal(first.response_mask, again.response_mask)
    assert not torch.equal(first.response_ids, other.response_ids)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, max_new_tokens=6, record_topk=8),
    # top-k/top-p filtering keeps fewer than 8 tokens: the record must still be the RAW top-8
    SamplingParams(temperature=0.7, top_p=0.5, top_k=3, max_new_tokens=6, record_topk=8),
    SamplingParams(temperature=0, max_new_tokens=6, record_topk=8),
])
def test_recorded_topk_equals_topk_of_a_full_forward(tiny_lm, tokenizer, prompts, params):
    gen = HFRollout(tiny_lm, tokenizer).generate(prompts, params, seed=3)
    width = gen.response_ids.shape[1]
    assert gen.topk_ids.shape == (len(prompts), width, 8)
    inputs = prompt_response_inputs(prompts, gen.response_ids, gen.response_mask, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = tiny_lm(**inputs, logits_to_keep=width + 1).logits[:, :-1]  # [B, T, V]
    expected = logits.topk(8, dim=-1).indices
    mask = gen.response_mask
    assert torch.equal(gen.topk_ids[mask], expected[mask])
    # the sampled token is inside the recorded top-k whenever filtering kept only top tokens
    if params.top_k:
        assert (gen.topk_ids[mask][:, :params.top_k] == gen.response_ids[mask].unsqueeze(-1)).any(-1).all()


def test_generation_stops_at_eos_and_masks_the_rest(tiny_model, tokenizer, prompts):
    """A random model never says EOS, so declare the token it emits third as an extra stop id."""
    model = load_causal_lm(str(tiny_model)).eval()
    free = HFRollout(model, tokenizer).generate(prompts[:2], GREEDY, seed=0)
    stop = int(free.response_ids[0, 2])
    first_stop = free.response_ids[0].tolist().index(stop)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    gen = HFRollout(model, tokenizer).generate(prompts[:2], GREEDY, seed=0)
    assert gen.response_mask[0].tolist()[:first_stop + 1] == [True] * (first_stop + 1)
    assert not gen.response_mask[0, first_stop + 1:].any()
    assert gen.response_ids[0, first_stop] == stop  # the stop token is kept (and trained on)
    assert (gen.response_ids[0, first_stop + 1:] == tokenizer.pad_token_id).all()
    row1 = free.response_ids[1].tolist()
    n1 = row1.index(stop) + 1 if stop in row1 else len(row1)
    assert int(gen.response_mask[1].sum()) == n1
    assert gen.response_ids[1, :n1].tolist() == row1[:n1]


def test_chunked_generation_equals_one_batch(tiny_lm, tokenizer, prompts):
    params = SamplingParams(temperature=0, max_new_tokens=5, record_topk=4)
    whole = HFRollout(tiny_lm, tokenizer, batch_size=64).generate(prompts, params, seed=0)
    chunked = HFRollout(tiny_lm, tokenizer, batch_size=3).generate(prompts, params, seed=0)
    mask = whole.response_mask
    assert torch.equal(whole.response_mask, chunked.response_mask)
    assert torch.equal(whole.response_ids[mask], chunked.response_ids[mask])
    assert torch.equal(whole.topk_ids[mask], chunked.topk_ids[mask])


# -- TeacherWorker ---------------------------------------------------------------------------------

def _random_responses(lengths, width, pad_id, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 40000, (len(lengths), width), generator=generator)
    mask = torch.arange(width).expand(len(lengths), width) < torch.tensor(lengths).unsqueeze(-1)
    return ids.masked_fill(~mask, pad_id), mask


def _logprobs_alone(model, prompt, response, temperature):
    """Brute force: the row alone, no padding, full-vocabulary log-softmax. -> [len(response), V]"""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double()
    return torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(response)] / temperature, dim=-1)


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


# -- StudentWorker ---------------------------------------------------------------------------------

def test_update_toward_a_different_teacher_lowers_the_loss(sharp_tiny_model, sharp_tiny_deeper_model, prompts,
                                                           teacher_prompts):
    student = _student(sharp_tiny_model, lr=1e-3, micro_batch_size=4)
    teacher = _teacher(sharp_tiny_deeper_model)
    batch = _update_batch(student, teacher, prompts, teacher_prompts)
    before = student.state_dict()
    losses = [student.update(batch)["loss"] for _ in range(5)]
    assert losses[0] > 0.05  # different models: a real distance to close
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert _max_weight_change(before, student.state_dict()) > 1e-4


def _tail_kl_brute_force(student_logp, teacher_logp, support):
    """Reverse KL between the (K+1)-bucket coarse-grainings: the support ids plus one 'rest' bucket.
    student_logp/teacher_logp: full-vocabulary log-probs [T, V] float64; support [T, K]. -> [T]"""
    p, q = student_logp.gather(-1, support).exp(), teacher_logp.gather(-1, support).exp()
    p_rest, q_rest = 1 - p.sum(-1), 1 - q.sum(-1)
    return (p * (p.log() - q.log())).sum(-1) + p_rest * (p_rest.log() - q_rest.log())


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_reported_loss_equals_brute_force_tail_kl(sharp_tiny_model, sharp_tiny_deeper_model, prompts,
                                                  teacher_prompts, aggregation):
    """The update's loss is the tail KL between the student (no context) and the teacher (context) at the
    same response tokens, averaged over the whole step's tokens (or sequences), each row run alone."""
    student = _student(sharp_tiny_model, micro_batch_size=3, aggregation=aggregation, temperature=0.8)
    teacher = _teacher(sharp_tiny_deeper_model, temperature=0.8)
    lengths = [5, 1, 3, 6]
    batch = _update_batch(student, teacher, prompts, teacher_prompts, lengths=lengths)
    per_row = []
    for row, n in enumerate(lengths):
        response = batch.response_ids[row, :n].tolist()
        student_logp = _logprobs_alone(student.model, prompts[row], response, 0.8)
        teacher_logp = _logprobs_alone(teacher.model, teacher_prompts[row], response, 0.8)
        per_row.append(_tail_kl_brute_force(student_logp, teacher_logp, batch.support_ids[row, :n]))
    if aggregation == "token_mean":
        expected = torch.cat(per_row).mean().item()
    else:
        expected = torch.stack([kl.mean() for kl in per_row]).mean().item()
    assert expected > 0.01  # far from rounding noise
    assert student.update(batch)["loss"] == pytest.approx(expected, abs=1e-5)


def test_rollout_after_update_uses_the_updated_weights(sharp_tiny_model, sharp_tiny_deeper_model, prompts,
                                                       teacher_prompts, tmp_path):
    student = _student(sharp_tiny_model, lr=3e-2, micro_batch_size=4)
    teacher = _teacher(sharp_tiny_deeper_model)
    greedy_before = student.generate(prompts, GREEDY, seed=0)
    batch = _update_batch(student, teacher, prompts, teacher_prompts)
    for _ in range(3):
        student.update(batch)
    student.sync_rollout()
    greedy_after = student.generate(prompts, GREEDY, seed=0)
    assert not torch.equal(greedy_before.response_ids, greedy_after.response_ids)  # the update matters
    student.save(str(tmp_path))
    fresh = load_causal_lm(str(tmp_path / "model")).eval()
    reference = HFRollout(fresh, student.tokenizer).generate(prompts, GREEDY, seed=0)
    assert torch.equal(greedy_after.response_ids, reference.response_ids)
    assert torch.equal(greedy_after.response_mask, reference.response_mask)


def test_save_load_restores_weights_and_optimizer_state(sharp_tiny_model, sharp_tiny_deeper_model, prompts,
                                                        teacher_prompts, tmp_path):
    original = _student(sharp_tiny_model, lr=1e-3, micro_batch_size=2)
    batch = _update_batch(original, _teacher(sharp_tiny_deeper_model), prompts, teacher_prompts)
    original.update(batch)
    original.save(str(tmp_path))
    restored = _student(sharp_tiny_model, lr=1e-3, micro_batch_size=2)
    restored.load(str(tmp_path))
    _assert_same_weights(original.state_dict(), restored.state_dict())
    # Adam's moments and step count came back too: the next identical update lands on identical weights
    stats_original, stats_restored = original.update(batch), restored.update(batch)
    _assert_same_weights(original.state_dict(), restored.state_dict(), atol=1e-7)
    assert stats_original["loss"] == pytest.approx(stats_restored["loss"], abs=1e-7)
    assert restored.optimizer.state_dict()["state"][0]["step"].item() == 2


def test_load_refuses_a_checkpoint_of_another_model(sharp_tiny_model, sharp_tiny_deeper_model, tmp_path):
    _student(sharp_tiny_deeper_model).save(str(tmp_path))
    with pytest.raises(RuntimeError, match="does not match the model"):
        _student(sharp_tiny_model).load(str(tmp_path))


def test_identical_teacher_gives_zero_loss_and_zero_gradient(sharp_tiny_model, prompts):
    student = _student(sharp_tiny_model, lr=1e-3, support_mode="tail")
    teacher = _teacher(sharp_tiny_model)  # the student's initial weights, same prompts: nothing to distill
    batch = _update_batch(student, teacher, prompts, prompts)
    stats = student.update(batch)
    assert stats["loss"] == pytest.approx(0.0, abs=1e-5)
    assert stats["grad_norm"] == pytest.approx(0.0, abs=1e-6)
    assert stats["skipped"] == 0.0
    assert stats["student_mass"] == pytest.approx(stats["teacher_mass"], abs=1e-5)


def test_nonfinite_teacher_logprobs_skip_the_step(sharp_tiny_model, sharp_tiny_deeper_model, prompts,
                                                  teacher_prompts):
    student = _student(sharp_tiny_model, lr=1e-3)
    batch = _update_batch(student, _teacher(sharp_tiny_deeper_model), prompts, teacher_prompts)
    poisoned = torch.clone(batch.teacher_logprobs)
    poisoned[1, 0, 0] = float("nan")
    before = student.state_dict()
    stats = student.update(UpdateBatch(**{**batch.__dict__, "teacher_logprobs": poisoned}))
    assert stats["skipped"] == 1.0
    _assert_same_weights(before, student.state_dict())
    assert student.optimizer.state_dict()["state"] == {}  # no optimiser step was taken
    # the skipped step leaves nothing behind: the next good batch trains normally
    stats = student.update(batch)
    assert stats["skipped"] == 0.0 and _max_weight_change(before, student.state_dict()) > 1e-4


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_gradient_accumulation_equals_one_big_batch(sharp_tiny_model, sharp_tiny_deeper_model, prompts,
                                                    teacher_prompts, aggregation):
    """Micro-batches of 2 must give the same step as one pass over all 4 sequences, with rows of different
    prompt and response lengths (the normaliser is the whole step's, not each micro-batch's)."""
    kwargs = dict(lr=1e-3, grad_clip=1e6, aggregation=aggregation)  # no clipping: compare raw gradients
    small = _student(sharp_tiny_model, micro_batch_size=2, **kwargs)
    whole = _student(sharp_tiny_model, micro_batch_size=4, **kwargs)
    batch = _update_batch(small, _teacher(sharp_tiny_deeper_model), prompts, teacher_prompts, lengths=[6, 1, 4, 2])
    stats_small, stats_whole = small.update(batch), whole.update(batch)
    assert stats_small["loss"] == pytest.approx(stats_whole["loss"], rel=1e-5)
    assert stats_small["grad_norm"] == pytest.approx(stats_whole["grad_norm"], rel=1e-4)
    for (name, p_small), p_whole in zip(small.model.named_parameters(), whole.model.parameters()):
        torch.testing.assert_close(p_small.grad, p_whole.grad, atol=1e-5, rtol=1e-4, msg=name)
    # (weights are not compared: Adam's first step is ~lr * sign(g), and differently packed micro-batches
    # round near-zero gradient entries differently)
    assert _max_weight_change(small.state_dict(), _student(sharp_tiny_model).state_dict()) > 1e-4


# -- the chunked lm_head path (loss.lm_head_chunk_size) equals the full-logits path ------------------------

@pytest.mark.parametrize("kl_loss_type,support_mode,aggregation", [
    ("full", "tail", "token_mean"), ("full", "partial", "seq_mean"), ("full", "renorm", "token_mean"),
    ("k3", "tail", "token_mean")])
def test_chunked_head_update_equals_full_logits(sharp_tiny_model, sharp_tiny_deeper_model, prompts,
                                                teacher_prompts, kl_loss_type, support_mode, aggregation):
    kwargs = dict(lr=1e-3, grad_clip=1e6, micro_batch_size=3, temperature=0.8, kl_loss_type=kl_loss_type,
                  support_mode=support_mode, aggregation=aggregation)
    chunked = _student(sharp_tiny_model, lm_head_chunk_size=5, **kwargs)  # ragged last chunk
    full = _student(sharp_tiny_model, lm_head_chunk_size=0, **kwargs)
    assert chunked.lm_head_chunk_size == 5 and full.lm_head_chunk_size == 0
    teacher = _teacher(sharp_tiny_deeper_model, temperature=0.8, lm_head_chunk_size=0)
    batch = _update_batch(full, teacher, prompts, teacher_prompts, k=1 if kl_loss_type == "k3" else 8,
                          lengths=[5, 1, 3, 6])
    a, b = chunked.update(batch), full.update(batch)
    for key in ("loss", "entropy", "student_mass", "teacher_mass"):
        assert a[key] == pytest.approx(b[key], rel=2e-5, abs=1e-6), key
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # gradients, not weights: Adam's first step is ~lr * sign(g), so rounding-level differences in
    # near-zero gradient entries would flip whole lr-sized steps
    for (name, p_chunked), p_full in zip(chunked.model.named_parameters(), full.model.parameters()):
        norm = p_full.grad.norm().item()
        assert norm > 0 and (p_chunked.grad - p_full.grad).norm().item() < 1e-4 * norm, name


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

    from opcd.lm_head import is_plain_head

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8)
    torch.manual_seed(0)
    assert is_plain_head(LlamaForCausalLM(LlamaConfig(**small)))
    gemma = Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=0.5))
    assert not is_plain_head(gemma)


# -- padding-free packed micro-batches and token-budget micro-batching ---------------------------------------

def _assert_same_step(a: StudentWorker, b: StudentWorker, stats_a: dict, stats_b: dict):
    for key in ("loss", "entropy", "student_mass", "teacher_mass", "grad_norm"):
        assert stats_a[key] == pytest.approx(stats_b[key], rel=1e-4, abs=1e-6), key
    for (name, p_a), p_b in zip(a.model.named_parameters(), b.model.parameters()):
        norm = p_b.grad.norm().item()
        assert norm > 0 and (p_a.grad - p_b.grad).norm().item() < 1e-4 * norm, name


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_packed_update_equals_padded(sharp_tiny_model, sharp_tiny_deeper_model, prompts, teacher_prompts,
                                     aggregation):
    kwargs = dict(lr=1e-3, grad_clip=1e6, micro_batch_size=3, aggregation=aggregation)
    packed = _student(sharp_tiny_model, padding_free=True, **kwargs)
    padded = _student(sharp_tiny_model, padding_free=False, **kwargs)
    assert packed.padding_free and not padded.padding_free
    batch = _update_batch(padded, _teacher(sharp_tiny_deeper_model, padding_free=False), prompts, teacher_prompts,
                          lengths=[6, 1, 4, 2])
    _assert_same_step(packed, padded, packed.update(batch), padded.update(batch))


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


def test_token_budget_micro_batches_equal_one_big_batch(sharp_tiny_model, sharp_tiny_deeper_model, prompts,
                                                        teacher_prompts):
    kwargs = dict(lr=1e-3, grad_clip=1e6)
    budget = _student(sharp_tiny_model, micro_batch_tokens=80, **kwargs)  # sequences of 32-43 tokens
    whole = _student(sharp_tiny_model, micro_batch_size=4, **kwargs)
    teacher = _teacher(sharp_tiny_deeper_model, micro_batch_tokens=50)
    batch = _update_batch(whole, teacher, prompts, teacher_prompts, lengths=[6, 1, 4, 2])
    lengths = [len(p) + int(n) for p, n in zip(batch.prompt_ids, batch.response_mask.sum(-1))]
    plan = plan_micro_batches([0, 1, 2, 3], lengths, size=8, token_budget=80)
    assert 1 < len(plan) < 4, (lengths, plan)  # some micro-batches hold several sequences, not all
    _assert_same_step(budget, whole, budget.update(batch), whole.update(batch))


def test_packing_is_the_default_only_with_flash_attention():
    from types import SimpleNamespace

    from opcd.lm_head import packing_pays

    assert packing_pays(SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2")))
    assert not packing_pays(SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa")))
    assert not packing_pays(SimpleNamespace(config=SimpleNamespace()))
