"""End-to-end distillation through Ray with tiny models that share the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opcd.config import load_config
from opcd.pipelines.distill import run_distill

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


def _overrides(runs_dir: Path, student: Path, **extra) -> list[str]:
    base = {"model.path": str(student), "trainer.runs_dir": str(runs_dir), "trainer.exp_name": "run",
            "trainer.batch_size": 4, "trainer.micro_batch_size": 2, "trainer.lr": 3e-3,
            "trainer.total_training_steps": 4, "trainer.save_freq": 2, "trainer.eval_limit": 4,
            "trainer.loggers": "[jsonl]", "rollout.max_response_length": 10, "loss.kl_topk": 16}
    base.update(extra)
    return [f"{key}={value}" for key, value in base.items()]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model" / "model.safetensors")


def test_kl_falls_with_a_deeper_teacher(tmp_path, tiny_model, tiny_deeper_model):
    cfg = load_config(_overrides(tmp_path, tiny_model, **{
        "model.teacher_path": str(tiny_deeper_model), "trainer.total_training_steps": 12,
        "trainer.save_freq": 0, "trainer.batch_size": 8, "trainer.micro_batch_size": 8}))
    summary = run_distill(cfg)
    kl = [row["loss/kl"] for row in _metrics(tmp_path / "run")]
    assert len(kl) == 12
    assert sum(kl[-3:]) / 3 < 0.7 * sum(kl[:3]) / 3, kl
    assert set(summary["eval"]) == {"student_before", "teacher_with_context", "student_after"}
    assert (tmp_path / "run" / "global_step_12" / "COMPLETE").is_file()


def test_real_model_learns_the_context_with_itself_as_teacher(tmp_path):
    """The method's default setting on the bundled SmolLM2-135M: teacher = the frozen initial
    weights WITH the French system prompt. (A random tiny model ignores its context, so this check
    needs a real one.) Measured: KL 0.41 -> 0.20 and French share 0 -> 0.6 of rollouts in 8 steps."""
    cfg = load_config([f"trainer.runs_dir={tmp_path}", "trainer.exp_name=run", "trainer.lr=5e-5",
                       "trainer.total_training_steps=8", "trainer.save_freq=0", "trainer.loggers=[jsonl]",
                       "rollout.max_response_length=16", "trainer.eval_before=false", "trainer.eval_after=false"])
    run_distill(cfg)
    rows = _metrics(tmp_path / "run")
    kl = [row["loss/kl"] for row in rows]
    french = [row["rollout/score"] for row in rows]
    assert sum(kl[-3:]) < 0.85 * sum(kl[:3]), kl
    assert sum(french[-3:]) > sum(french[:3]) + 0.5, french
    assert all(0 < row["loss/student_support_mass"] <= 1 for row in rows)


def test_resumed_run_continues_exactly(tmp_path, tiny_model):
    """A run stopped after step 2 and resumed ends with the same weights and step metrics as an
    uninterrupted run (data position, optimiser state and sampling seeds are all restored)."""
    straight = load_config(_overrides(tmp_path / "a", tiny_model))
    run_distill(straight)
    run_distill(load_config(_overrides(tmp_path / "b", tiny_model, **{"trainer.total_training_steps": 2})))
    resumed = run_distill(load_config(_overrides(tmp_path / "b", tiny_model)))
    assert resumed["final_step"] == 4
    a, b = _weights(tmp_path / "a/run/global_step_4"), _weights(tmp_path / "b/run/global_step_4")
    assert all(torch.equal(a[name], b[name]) for name in a)
    skip = {"perf/", "timing/"}
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(tuple(skip))} for r in rows]
    assert strip(_metrics(tmp_path / "a/run")) == strip(_metrics(tmp_path / "b/run"))
    assert not torch.equal(a["model.embed_tokens.weight"], _weights(tmp_path / "b/run/global_step_2")["model.embed_tokens.weight"])
