"""The math and evaluation launchers keep the reference's command lines (seed-README.txt) and map them onto opcd."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, cfg: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPCD_NUM_GPUS": "0", ("OPCD_CFG_ONLY" if cfg else "OPCD_DRY_RUN"): "1"}
    env.pop("WANDB_API_KEY", None)
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *args], env=env, capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def _overrides(result) -> dict[str, str]:
    words = shlex.split(result.stdout)
    return dict(w.split("=", 1) for w in words[2:] if "=" in w) | {"_command": words[1]}


def test_math_consolidate_reference_command():
    args = shlex.split("--model Qwen/Qwen3-8B --exp_name math-q3-8b-lr5e-6 --nnodes 2 --rollout_n 1 "
                       "--kl_loss_type full --kl_topk 256 --actor_lr 5e-6 --max_response_length 16384 "
                       "--exp_path /tmp/best.txt")
    got = _overrides(_run("math_consolidate.sh", *args))
    assert got["_command"] == "distill" and got["task"] == "math"
    assert got["model.path"] == "Qwen/Qwen3-8B" and got["task.context_path"] == "/tmp/best.txt"
    assert got["rollout.temperature"] == "0.6" and got["trainer.batch_size"] == "128"
    assert got["ray.address"] == "auto" and got["ray.nnodes"] == "2" and got["trainer.lr"] == "5e-6"


def test_math_consolidate_cross_size_teacher_resolves():
    result = _run("math_consolidate.sh", "--model", "Qwen/Qwen3-4B", "--ref_model_path", "/tmp/Qwen3-8B",
                  "--exp_name", "x", "--exp_path", "experiences/math_sample.txt", cfg=True)
    assert result.returncode == 0, result.stderr
    assert "teacher_path: /tmp/Qwen3-8B" in result.stdout and "name: math" in result.stdout


def test_math_consolidate_requires_the_experience():
    result = _run("math_consolidate.sh", "--model", "m", "--exp_name", "e")
    assert result.returncode == 2 and "--exp_path is required" in result.stderr


def test_math_extract_single_run_and_reference_setting():
    single = _overrides(_run("math_extract_inturn.sh", "--model", "m", "--exp_name", "e", "--ckpt", "3",
                             "--exp_sel_with_prev", "True", "--val_samples_limit", "50"))
    assert single["_command"] == "extract" and single["extract.seeds"] == "[3]"
    assert single["extract.writer_sees_previous"] == "true" and single["extract.heldout_size"] == "50"
    reference = _overrides(_run("math_extract_inturn.sh"))
    assert reference["model.path"] == "Qwen/Qwen3-8B" and reference["extract.seeds"] == "[0,1,2,3,4,5,6,7,8,9]"
    assert reference["extract.stream_items"] == "30" and reference["rollout.max_response_length"] == "16384"
    bad = _run("math_extract_inturn.sh", "--model", "m", "--exp_name", "e", "--prompt_version", "v9")
    assert bad.returncode == 2 and "--prompt_version" in bad.stderr
