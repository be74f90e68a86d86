"""The launchers fill the nodes they are given (1x1, 1x8, 2x8 GPUs, and CPU), and take the paper's
data from ./data when tools/prepare_data.py wrote it, else say in one line which fallback they use."""

from __future__ import annotations

from pathlib import Path

import pytest

from opcd.config import load_config
from opcd.data.rows import bundled_path
from opcd.tasks.loading import REASONING_GYM_DEFAULT_SIZE, load_rows
from tests.launchers.test_published_commands import MATH_CONSOLIDATE, ROOT, SYS_GEN, overrides, resolved, run


@pytest.mark.parametrize("nnodes, gpus", [(1, 1), (1, 8), (2, 8)])
def test_launcher_fills_every_gpu(nnodes, gpus):
    args = MATH_CONSOLIDATE.replace("--nnodes 2", f"--nnodes {nnodes}")
    cfg = resolved(run("math_consolidate.sh", args, cfg=True, gpus=gpus))
    assert cfg["ray.gpus_per_node"] == gpus and cfg["ray.nnodes"] == nnodes
    assert cfg["ray.ranks_per_group"] == nnodes * gpus  # student FSDP2 over every GPU
    assert cfg["ray.teacher_ranks"] == 0 and cfg["ray.placement"] == "colocate"  # teacher: same ranks, same GPUs
    assert cfg["rollout.backend"] == "vllm" and cfg["model.dtype"] == "bfloat16"
    assert cfg["model.activation_checkpointing"] is True


def test_cpu_launch_is_one_fp32_rank_with_transformers_generate():
    cfg = resolved(run("math_consolidate.sh", MATH_CONSOLIDATE.replace("--nnodes 2", "--nnodes 1"), cfg=True))
    assert (cfg["ray.ranks_per_group"], cfg["rollout.backend"], cfg["model.dtype"]) == (1, "hf", "float32")
    assert cfg["model.activation_checkpointing"] is False and cfg["model.attn_implementation"] is None


@pytest.mark.parametrize("overrides_, ranks", [
    (["ray.gpus_per_node=1"], 1), (["ray.gpus_per_node=8"], 8),
    (["ray.gpus_per_node=8", "ray.nnodes=2", "ray.address=auto"], 16),
    (["ray.gpus_per_node=8", "ray.placement=separate"], 4),
    (["ray.gpus_per_node=8", "ray.placement=separate", "ray.teacher_ranks=2"], 6),
    (["ray.gpus_per_node=8", "ray.ranks_per_group=2"], 2), ([], 1)])
def test_opcd_defaults_fill_the_gpus_too(overrides_, ranks):
    """Without the launchers: `auto` values resolve from ray.gpus_per_node, and --cfg shows them."""
    cfg = load_config(["model=hf", "model.path=Qwen/Qwen3-8B", *overrides_])
    gpu = cfg.ray.gpus_per_node > 0
    assert cfg.ray.ranks_per_group == ranks
    assert cfg.model.dtype == ("bfloat16" if gpu else "float32")
    assert cfg.model.activation_checkpointing is gpu
    assert cfg.rollout.backend in (("vllm", "hf") if gpu else ("hf",))  # vllm when installed with a GPU


def test_data_dir_is_used_when_present(tmp_path):
    for name in ("dapo_train", "dapo_validation", "dapo_test"):
        (tmp_path / f"{name}.parquet").write_bytes(b"")
    result = run("math_consolidate.sh", MATH_CONSOLIDATE, data_dir=tmp_path)
    got = overrides(result)
    assert result.stderr == ""  # nothing to warn about
    assert got["task.train_data"] == f"{tmp_path}/dapo_train.parquet"
    assert got["task.validation_data"] == f"{tmp_path}/dapo_validation.parquet"
    assert got["task.test_data"] == f"{tmp_path}/dapo_test.parquet"


def test_missing_data_is_one_line_naming_the_fallback_and_its_size(tmp_path):
    result = run("math_consolidate.sh", MATH_CONSOLIDATE, data_dir=tmp_path)
    assert result.returncode == 0
    (line,) = result.stderr.splitlines()
    assert "dapo_train.parquet" in line and "rg:gsm_symbolic" in line
    assert f"{REASONING_GYM_DEFAULT_SIZE} problems per split" in line
    sys_run = run("sys_generate_offp.sh", SYS_GEN, data_dir=tmp_path)
    (line,) = sys_run.stderr.splitlines()
    sizes = [len(load_rows(str(bundled_path(f"medmcqa_{split}")))) for split in ("train", "test")]
    assert "bundled:medmcqa_train" in line and f"({sizes[0]} + {sizes[1]} rows)" in line
    assert "task.train_data" not in overrides(sys_run)  # the preset's bundled samples


def test_partial_data_is_an_error_and_named_data_is_quiet(tmp_path):
    (tmp_path / "dapo_train.parquet").write_bytes(b"")
    partial = run("math_consolidate.sh", MATH_CONSOLIDATE, data_dir=tmp_path)
    assert partial.returncode == 2 and "dapo_validation.parquet" in partial.stderr
    named = run("math_consolidate.sh", MATH_CONSOLIDATE + " task.train_data=my.parquet", data_dir=tmp_path / "x")
    assert named.returncode == 0 and named.stderr == ""


def test_the_launchers_know_the_generated_size():
    text = (ROOT / "scripts" / "common.sh").read_text()
    assert f"OPCD_RG_SIZE={REASONING_GYM_DEFAULT_SIZE} " in text


def test_task_presets_keep_validation_apart_from_test():
    cfg = load_config(["task=math"])
    assert cfg.task.selection_data == ("rg:gsm_symbolic", "validation")
    assert load_config(["task=medmcqa"]).task.selection_data == ("bundled:medmcqa_test", None)
    assert Path(ROOT / "tools" / "prepare_data.py").is_file()


def test_separate_teacher_pool_through_the_launcher_splits_the_gpus():
    args = MATH_CONSOLIDATE.replace("--nnodes 2", "--nnodes 1") + " ray.placement=separate ray.teacher_ranks=2"
    cfg = resolved(run("math_consolidate.sh", args, cfg=True, gpus=8))
    assert (cfg["ray.ranks_per_group"], cfg["ray.teacher_ranks"]) == (6, 2)
