"""The memory plan (opcd/runtime/memory_plan.py): parameter counts against the published sizes and
transformers' own models, the paper's settings resolved as the launchers resolve them (hand-computed
bytes), the KV-cache warning, the refusal, and `opcd distill --plan` end to end (no Ray, no model)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from opcd.config.load import load_config
from opcd.config.resolve import Machine
from opcd.errors import ConfigError
from opcd.runtime.memory_plan import GiB, Layout, check_fits, plan
from opcd.runtime.model_shapes import KNOWN_CONFIGS, ModelShape

REPO = Path(__file__).resolve().parents[2]
QWEN3_8B = ModelShape.from_config(KNOWN_CONFIGS["Qwen/Qwen3-8B"], "test")
LLAMA31_8B = ModelShape.from_config(KNOWN_CONFIGS["meta-llama/Llama-3.1-8B-Instruct"], "test")


def test_parameter_counts_are_the_published_ones():
    assert QWEN3_8B.params == 8_190_735_360
    assert LLAMA31_8B.params == 8_030_261_248
    assert ModelShape.from_config(KNOWN_CONFIGS["smollm2-135m-instruct"], "t").params == 134_515_008


@pytest.mark.parametrize("model_type,extra", [("qwen3", {}), ("llama", {"attention_bias": True}), ("qwen2", {}),
                                              ("llama", {"tie_word_embeddings": True})])
def test_parameter_count_equals_transformers_model(model_type, extra):
    """The formula against the real architecture built on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {"num_hidden_layers": 3, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "intermediate_size": 96, "vocab_size": 300, "tie_word_embeddings": False, **extra}
    config = AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert ModelShape.from_config({"model_type": model_type, **fields}, "t").params == \
        sum(p.numel() for p in model.parameters())


def _launcher_config(script: str, args: str, gpus: int = 8):
    """The config a launcher's command resolves to on nodes of `gpus` GPUs with vLLM (as `--cfg`)."""
    env = {**os.environ, "OPCD_DRY_RUN": "1", "OPCD_NUM_GPUS": str(gpus)}
    proc = subprocess.run(["bash", f"scripts/{script}", *shlex.split(args)], env=env, capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return load_config(shlex.split(proc.stdout)[2:], Machine(gpus, True))


MATH = ("--model Qwen/Qwen3-8B --exp_name m --kl_topk 256 --actor_lr 5e-6 --max_response_length 16384 "
        "--exp_path experiences/math_sample.txt")
SYS = ("--model meta-llama/Llama-3.1-8B-Instruct --exp_name s --system_prompt_type medmcqa --kl_topk 256 "
       "--actor_lr 5e-6 --max_response_length 512 --exp_path system_prompts/medmcqa.txt")
# vLLM's share of an 80 GiB card with 0.5 utilisation, less the bf16 weights and its activation estimate
# (16384 tokens x (2 x 12288 + 4096 + 2 x 1024 + 4 x 4096) x 2 B + 1024 x 151936 x 8 B + 0.5 GiB graphs)
QWEN_KV_AVAILABLE = 42_949_672_960 - 16_381_470_720 - (1_543_503_872 + 1_244_659_712 + 536_870_912)


@pytest.mark.parametrize("nodes,ranks", [(2, 16), (1, 8)])
def test_qwen3_8b_math_on_80gb(nodes, ranks):
    cfg = _launcher_config("math_consolidate.sh", f"{MATH} --nnodes {nodes}")
    memory = plan(QWEN3_8B, QWEN3_8B, Layout.from_config(cfg), 80 * GiB)
    items = memory.items
    assert items["student weights (fp32 shard)"] == 8_190_735_360 * 4 // ranks
    assert items["AdamW moments (2 x fp32 shard)"] == 8_190_735_360 * 8 // ranks
    assert items["teacher weights (shard)"] == 8_190_735_360 * 2 // ranks
    assert items["engine weights (TP shard)"] == 16_381_470_720
    # 128 rows / ranks engines, each (5,120 prompt + 16,384 response) tokens x 2 x 36 x 8 x 128 x 2 B
    assert memory.kv_needed == (128 // ranks) * 21_504 * 147_456
    assert memory.kv_available == QWEN_KV_AVAILABLE
    assert memory.warnings == [
        f"WARNING: the engine's KV cache (21.65 GiB) holds 7 of its {128 // ranks} rows at full length "
        f"({memory.kv_needed / GiB:.2f} GiB needed): vLLM will preempt and recompute; raise "
        "rollout.vllm_gpu_memory_utilization or use more GPUs"]
    # generate: fp32 shard + moments + teacher shard + two processes' contexts + vLLM's 40 GiB
    assert memory.phases["generate"] == 8_190_735_360 * 14 // ranks + 2 * GiB + 40 * GiB
    assert memory.peak_phase == "generate"
    check_fits(memory)  # fits: no exception


def test_llama31_8b_sys_prompt_on_1x8():
    cfg = _launcher_config("sys_consolidate.sh", SYS)
    lay = Layout.from_config(cfg)
    assert (lay.rows, lay.prompt_tokens, lay.response_tokens, lay.micro_tokens) == (128, 5120, 512, 8 * 5632)
    memory = plan(LLAMA31_8B, LLAMA31_8B, lay, 80 * GiB)
    assert memory.items["student weights (fp32 shard)"] == 4_015_130_624
    assert memory.kv_needed == 16 * 5632 * 131_072  # 16 rows x 5,632 tokens x 2 x 32 x 8 x 128 x 2 B
    assert memory.kv_available > memory.kv_needed and memory.warnings == []
    check_fits(memory)


def test_a_phase_over_the_card_is_refused_in_one_line():
    cfg = _launcher_config("math_consolidate.sh", MATH)
    memory = plan(QWEN3_8B, QWEN3_8B, Layout.from_config(cfg), 40 * GiB)
    with pytest.raises(ConfigError) as err:
        check_fits(memory)
    # the engine scales with the card (0.5 x 40 GiB): the update (fp32 shards, activations) is the peak
    assert str(err.value).startswith("memory plan: the update phase needs 41.51 GiB per GPU")
    assert "more than the card's 40.00 GiB" in str(err.value) and "\n" not in str(err.value)


def _cli(*args, gpus="0"):
    env = {**os.environ, "OPCD_NUM_GPUS": gpus, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "opcd.cli", "distill", "--plan", *args], env=env,
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_cli_plan_on_the_bundled_model_exits_0_without_ray():
    proc = _cli()
    assert proc.returncode == 0, proc.stderr
    assert "student smollm2-135m-instruct: 134,515,008 parameters" in proc.stdout
    assert "phases (sum resident on the student's GPU):" in proc.stdout and "headroom" in proc.stdout
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_cli_refuses_a_plan_over_the_card_and_a_bad_size():
    proc = _cli("model=hf", "model.path=Qwen/Qwen3-8B", "--gpu-memory", "20GiB", gpus="8")
    assert proc.returncode == 2 and proc.stderr.startswith("opcd: error: memory plan: the ")
    proc = _cli("--gpu-memory", "lots")
    assert proc.returncode == 2 and "--gpu-memory 'lots': expected a size" in proc.stderr


def test_cfg_carries_the_plan_as_yaml_comments():
    """`opcd distill --cfg` stays the config's YAML; the plan (or why it cannot be made) is in comments."""
    import yaml

    env = {**os.environ, "OPCD_NUM_GPUS": "8", "OPCD_VLLM": "1", "PYTHONPATH": str(REPO)}
    for model, expected in (("Qwen/Qwen3-8B", "#   headroom at the peak"), ("no/such-model", "# memory plan: no config")):
        proc = subprocess.run([sys.executable, "-m", "opcd.cli", "distill", "--cfg", "model=hf", f"model.path={model}"],
                              env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        assert expected in proc.stdout and yaml.safe_load(proc.stdout)["model"]["path"] == model


def test_tensor_parallel_engines_and_separate_teacher_gpus():
    """TP 2: half the engine's weights and KV heads per GPU, twice the rows per engine; KV heads are
    replicated, not split, past their count; a separate teacher is planned on GPUs of its own."""
    from dataclasses import replace

    lay = Layout.from_config(_launcher_config("math_consolidate.sh", MATH))
    tp2 = plan(QWEN3_8B, QWEN3_8B, replace(lay, tensor_parallel=2), 80 * GiB)
    assert tp2.items["engine weights (TP shard)"] == 16_381_470_720 // 2
    assert tp2.kv_needed == 32 * 21_504 * 147_456 // 2  # 4 engines of 32 rows, 4 of 8 KV heads per GPU
    assert QWEN3_8B.kv_bytes_per_token(2, 16) == 2 * 36 * 1 * 128 * 2
    apart = plan(QWEN3_8B, QWEN3_8B, replace(lay, colocated=False, teacher_ranks=8), 80 * GiB)
    assert apart.teacher_gpu == GiB + 8_190_735_360 * 2 // 8 + apart.items["teacher FSDP2 buffers"] \
        + apart.items["teacher scoring activations"]
    assert apart.phases["teacher scoring"] == apart.phases["generate"] - int(0.5 * 80 * GiB)  # no teacher here
