"""The hf rollout engine (opcd/rollout/hf.py) in process: batched greedy equals each prompt alone, seeded
sampling reproduces, recorded top-k ids equal a full forward's, EOS handling, chunked generation."""

import pytest
import torch

from opcd.data.batching import prompt_response_inputs, strip_after_eos
from opcd.models import load_causal_lm
from opcd.protocol import SamplingParams
from opcd.rollout.hf import HFRollout, _batch_bucket, resolve_cache
from tests.workers.common import (  # noqa: F401 (fixtures are registered by importing them)
    GREEDY, one_thread, prompts, teacher_prompts, tiny_lm, tokenizer)


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


@pytest.fixture(scope="module")
def sharp_lm(sharp_tiny_model):
    """Peaked distributions: sampled responses vary from token to token (the plain tiny model repeats one)."""
    return load_causal_lm(str(sharp_tiny_model)).eval()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_new_tokens=12, record_topk=8),
    SamplingParams(temperature=1.0, max_new_tokens=12, record_topk=8),
    SamplingParams(temperature=1.5, top_p=0.95, top_k=20, max_new_tokens=12, record_topk=8),
])
def test_static_cache_gives_the_dynamic_cache_ids_and_topk(sharp_lm, tokenizer, prompts, params):
    """The static cache (the GPU default) must sample what today's dynamic cache samples, per seed, and
    record the same top-k, over a batch of prompts of different lengths (left padding in both)."""
    dynamic = HFRollout(sharp_lm, tokenizer, cache="dynamic").generate(prompts, params, seed=5)
    static = HFRollout(sharp_lm, tokenizer, cache="static").generate(prompts, params, seed=5)
    assert torch.equal(dynamic.response_mask, static.response_mask)
    assert torch.equal(dynamic.response_ids, static.response_ids)
    mask = dynamic.response_mask
    assert torch.equal(dynamic.topk_ids[mask], static.topk_ids[mask])
    if params.temperature > 0:  # not a constant answer: the comparison above had something to compare
        assert len(set(dynamic.response_ids[mask].tolist())) > 1


def test_static_cache_sampling_is_reproducible_per_seed(sharp_lm, tokenizer, prompts):
    rollout = HFRollout(sharp_lm, tokenizer, cache="static")
    params = SamplingParams(temperature=1.0, max_new_tokens=8, record_topk=4)
    first = rollout.generate(prompts, params, seed=11)
    again = rollout.generate(prompts, params, seed=11)  # the cache is now sized by the first call: same result
    other = rollout.generate(prompts, params, seed=12)
    assert torch.equal(first.response_ids, again.response_ids)
    assert torch.equal(first.topk_ids, again.topk_ids)
    assert not torch.equal(first.response_ids, other.response_ids)


def test_static_cache_stops_at_eos_in_chunks_like_the_dynamic_cache(sharp_tiny_model, tokenizer, prompts):
    """A random model never says EOS, so declare a token it samples as an extra stop id; chunks of 3 prompts
    (a static cache per chunk) must give what the dynamic cache gives with the same chunks."""
    model = load_causal_lm(str(sharp_tiny_model)).eval()
    params = SamplingParams(temperature=1.0, max_new_tokens=10, record_topk=4)
    free = HFRollout(model, tokenizer, batch_size=3).generate(prompts, params, seed=2)
    r, row = next((r, row) for r, row in enumerate(free.response_ids.tolist()) if len(set(row)) > 1)
    stop = next(t for t in row if t != row[0])  # a token that first appears after position 0
    first_stop = row.index(stop)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    dynamic = HFRollout(model, tokenizer, batch_size=3).generate(prompts, params, seed=2)
    static = HFRollout(model, tokenizer, batch_size=3, cache="static").generate(prompts, params, seed=2)
    assert dynamic.response_mask[r].tolist()[:first_stop + 2] == [True] * (first_stop + 1) + [False]
    assert torch.equal(dynamic.response_mask, static.response_mask)
    assert torch.equal(dynamic.response_ids, static.response_ids)
    assert torch.equal(dynamic.topk_ids[dynamic.response_mask], static.topk_ids[static.response_mask])


def test_unset_cache_options_pick_the_fast_path_on_gpu_and_todays_path_on_cpu():
    assert resolve_cache(None, None, torch.device("cpu")) == ("dynamic", False)
    assert resolve_cache(None, None, torch.device("cuda", 0)) == ("static", True)
    assert resolve_cache("static", None, torch.device("cpu")) == ("static", False)
    assert resolve_cache("dynamic", None, torch.device("cuda", 0)) == ("dynamic", False)
    assert resolve_cache("static", False, torch.device("cuda", 0)) == ("static", False)
    assert resolve_cache(None, None, torch.device("cuda", 0), sharded=True) == ("static", False)
    with pytest.raises(ValueError, match="hf_cache=static"):
        resolve_cache("dynamic", True, torch.device("cpu"))


def test_compiled_batches_are_padded_to_a_few_shapes():
    assert [_batch_bucket(n, 64) for n in (1, 2, 3, 5, 8, 33, 64)] == [1, 2, 4, 8, 8, 64, 64]
    assert [_batch_bucket(n, 48) for n in (20, 40, 48)] == [32, 48, 48]  # the chunk size is a shape of its own


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (compiling the decoding step on CPU takes minutes)")
def test_compiled_static_rollout_on_gpu_keeps_the_contract(sharp_tiny_model, tokenizer, prompts):
    """On a GPU, the compiled static path (CUDA graphs) against the eager dynamic one, fp32: the same greedy
    ids and top-k; seeded sampling reproducible; a batch of 3 (padded to 4) gives its own rows back."""
    model = load_causal_lm(str(sharp_tiny_model)).eval().to("cuda")
    params = SamplingParams(temperature=0, max_new_tokens=12, record_topk=8)
    eager = HFRollout(model, tokenizer, cache="dynamic").generate(prompts, params, seed=0)
    fast = HFRollout(model, tokenizer, cache="static", compile=True)
    compiled = fast.generate(prompts, params, seed=0)
    assert torch.equal(eager.response_ids, compiled.response_ids)
    assert torch.equal(eager.topk_ids[eager.response_mask], compiled.topk_ids[compiled.response_mask])
    sampled = SamplingParams(temperature=1.0, max_new_tokens=12, record_topk=8)
    assert torch.equal(fast.generate(prompts, sampled, seed=4).response_ids,
                       fast.generate(prompts, sampled, seed=4).response_ids)
    three = fast.generate(prompts[:3], params, seed=0)
    assert torch.equal(three.response_ids, compiled.response_ids[:3, :three.response_ids.shape[1]])
def test_sampled_responses_do_not_depend_on_the_rest_of_the_batch(tiny_lm, tokenizer, prompts):
    """Per-prompt seeds: a share of the prompts called with the seed of its first prompt samples the same
    tokens as the whole batch (what lets several ranks split a rollout); so do smaller chunks."""
    from opcd.rollout import concat_generations, prompt_seed

    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=8, record_topk=4)
    whole = HFRollout(tiny_lm, tokenizer).generate(prompts, params, seed=11)
    parts = [HFRollout(tiny_lm, tokenizer).generate(prompts[a:b], params, prompt_seed(11, a))
             for a, b in ((0, 1), (1, 3), (3, 4))]
    split = concat_generations(parts, tokenizer.pad_token_id)
    chunked = HFRollout(tiny_lm, tokenizer, batch_size=3).generate(prompts, params, seed=11)
    for other in (split, chunked):
        assert torch.equal(other.response_mask, whole.response_mask)
        assert torch.equal(other.response_ids, whole.response_ids)
        assert torch.equal(other.topk_ids[whole.response_mask], whole.topk_ids[whole.response_mask])


def test_warp_keeps_the_tokens_transformers_warpers_keep():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    from opcd.rollout.hf import warp

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.6)):
        expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p < 1.0:
            expected = TopPLogitsWarper(top_p)(None, expected)
        got = warp(logits.clone(), SamplingParams(temperature, top_p, top_k))
        assert torch.equal(torch.isfinite(got), torch.isfinite(expected))
        torch.testing.assert_close(got[torch.isfinite(got)], expected[torch.isfinite(expected)])


def test_seeded_sampler_draws_from_the_warped_distribution():
    """Counter-based Gumbel-max draws, one stream per row: the frequencies match the softmax, and a
    token that top-k removed is never drawn."""
    from opcd.rollout.hf import _SeededSampler

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -5.0]]).expand(20_000, 5)
    params = SamplingParams(temperature=1.0, top_k=4)
    sampler = _SeededSampler(list(range(20_000)), params, prompt_width=3)
    scores = sampler(torch.zeros(20_000, 3, dtype=torch.long), logits.clone())
    chosen = scores.argmax(-1)
    assert torch.isfinite(scores).sum(-1).eq(1).all()
    frequencies = torch.bincount(chosen, minlength=5).float() / 20_000
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0]), -1)
    torch.testing.assert_close(frequencies[:4], expected, atol=0.015, rtol=0)
    assert frequencies[4] == 0
    # the next position of the same rows draws again (the stream advances with the generated tokens)
    again = sampler(torch.zeros(20_000, 4, dtype=torch.long), logits.clone()).argmax(-1)
    assert 0.3 < float((again != chosen).float().mean()) < 0.7
