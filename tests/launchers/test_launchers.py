"""The reference-compatible launch scripts: flags -> `opcd distill` Hydra overrides.

Each command line is run twice: with OPCD_DRY_RUN=1 (the script prints the command it would exec)
to check the override list, and with OPCD_CFG_ONLY=1 (the script runs `opcd distill --cfg ...`,
which loads no model) to check that opcd accepts the overrides and resolves the expected config.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SYS = REPO / "scripts" / "sys_consolidate.sh"

# The sys_consolidate.sh lines of the reference README, verbatim after the script name.
_COMMON = ("--nnodes 1 --rollout_n 1 --kl_loss_type full --kl_topk 256{renorm} --actor_lr 5e-6 "
           "--max_response_length 512 --experience_max_length 4096 --system_prompt_type {kind} "
           "--exp_path system_prompts/{kind}.txt --total_training_steps 50 --save_freq 2")
README_COMMANDS = {
    "sys-medmcqa-l31-8b": "--model meta-llama/Llama-3.1-8B-Instruct --exp_name sys-medmcqa-l31-8b "
                          + _COMMON.format(renorm="", kind="medmcqa"),
    "sys-medmcqa-l32-3b": "--model meta-llama/Llama-3.2-3B-Instruct --exp_name sys-medmcqa-l32-3b "
                          + _COMMON.format(renorm="", kind="medmcqa"),
    "sys-medmcqa-q25-7b": "--model Qwen/Qwen2.5-7B-Instruct --exp_name sys-medmcqa-q25-7b "
                          + _COMMON.format(renorm="", kind="medmcqa"),
    "sys-safety-l31-8b": "--model meta-llama/Llama-3.1-8B-Instruct --exp_name sys-safety-l31-8b "
                         + _COMMON.format(renorm=" --kl_renorm_topk True", kind="safety"),
    "sys-safety-l32-3b": "--model meta-llama/Llama-3.2-3B-Instruct --exp_name sys-safety-l32-3b "
                         + _COMMON.format(renorm="", kind="safety"),
    "sys-safety-q25-7b": "--model Qwen/Qwen2.5-7B-Instruct --exp_name sys-safety-q25-7b "
                         + _COMMON.format(renorm="", kind="safety"),
    "sys-safety-q25-7b-dist-3b": "--model Qwen/Qwen2.5-3B-Instruct --ref_model_path Qwen/Qwen2.5-7B-Instruct "
                                 "--exp_name sys-safety-q25-7b-dist-3b "
                                 + _COMMON.format(renorm="", kind="safety"),
}
MEDMCQA_L31 = shlex.split(README_COMMANDS["sys-medmcqa-l31-8b"])


def _expected(name: str) -> dict:
    """What each README command must resolve to."""
    words = shlex.split(README_COMMANDS[name])
    flags = dict(zip(words[::2], words[1::2]))
    return {
        "model.path": flags["--model"],
        "model.teacher_path": flags.get("--ref_model_path"),
        "task.name": flags["--system_prompt_type"],
        "task.context_path": flags["--exp_path"],
        "loss.support_mode": "renorm" if flags.get("--kl_renorm_topk") == "True" else "partial",
        "trainer.exp_name": name,
    }


def run_script(args: list[str], *, dry_run: bool = True, cfg_only: bool = False, gpus: int | None = 0,
               script: Path = SYS, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPCD_DRY_RUN", "OPCD_CFG_ONLY", "OPCD_NUM_GPUS", "WANDB_API_KEY")}
    if dry_run:
        env["OPCD_DRY_RUN"] = "1"
    if cfg_only:
        env["OPCD_CFG_ONLY"] = "1"
    if gpus is not None:
        env["OPCD_NUM_GPUS"] = str(gpus)
    env.update(extra_env or {})
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60,
                          cwd=REPO)


def dry_run(args: list[str], **kwargs) -> list[str]:
    """The overrides the script would pass to `opcd distill` (checked to be that command)."""
    proc = run_script(args, **kwargs)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert Path(argv[0]).name == "opcd" and argv[1] == "distill", argv
    return argv[2:]


def as_dict(overrides: list[str]) -> dict[str, str]:
    """key -> value of each override (the last one wins, as in Hydra)."""
    return dict(o.split("=", 1) for o in overrides if "=" in o)


def resolved(args: list[str], **kwargs) -> dict:
    """The config `opcd distill --cfg` resolves from the script's overrides, flattened to dotted keys."""
    proc = run_script(args, dry_run=False, cfg_only=True, **kwargs)
    assert proc.returncode == 0, proc.stderr
    flat = {}
    for section, values in yaml.safe_load(proc.stdout).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat


@pytest.mark.parametrize("name", sorted(README_COMMANDS))
def test_readme_command_overrides(name):
    overrides = dry_run(shlex.split(README_COMMANDS[name]))
    got = as_dict(overrides)
    want = _expected(name)
    assert got["model"] == "hf" and got["trainer"] == "paper" and got["task"] == want["task.name"]
    assert got["model.path"] == want["model.path"]
    if want["model.teacher_path"]:
        assert got["model.teacher_path"] == want["model.teacher_path"]
    else:
        assert "model.teacher_path" not in got  # default: the teacher is the student's initial weights
    assert got["task.context_path"] == want["task.context_path"]
    assert got["loss.support_mode"] == want["loss.support_mode"]
    assert got["trainer.exp_name"] == name
    assert {k: got[k] for k in (
        "task.experience_max_length", "rollout.n", "rollout.max_response_length", "rollout.temperature",
        "loss.kl_loss_type", "loss.kl_topk", "loss.kl_merge_indice", "trainer.lr", "trainer.batch_size",
        "trainer.total_training_steps", "trainer.save_freq", "trainer.loggers",
        "model.dtype", "model.attn_implementation", "ray.gpus_per_node")} == {
        "task.experience_max_length": "4096", "rollout.n": "1", "rollout.max_response_length": "512",
        "rollout.temperature": "1.0", "loss.kl_loss_type": "full", "loss.kl_topk": "256",
        "loss.kl_merge_indice": "false", "trainer.lr": "5e-6", "trainer.batch_size": "128",
        "trainer.total_training_steps": "50", "trainer.save_freq": "2", "trainer.loggers": "[console,jsonl]",
        "model.dtype": "float32", "model.attn_implementation": "null", "ray.gpus_per_node": "0"}
    assert "ray.address" not in got  # one node: a local Ray instance


@pytest.mark.parametrize("name", sorted(README_COMMANDS))
def test_readme_command_resolves(name):
    cfg = resolved(shlex.split(README_COMMANDS[name]))
    want = _expected(name)
    for key, value in want.items():
        assert cfg[key] == value, key
    assert cfg["loss.kl_topk"] == 256
    assert cfg["loss.kl_loss_type"] == "full"
    assert cfg["loss.kl_merge_indice"] is False
    assert cfg["trainer.lr"] == pytest.approx(5e-6)
    assert cfg["trainer.batch_size"] == 128
    assert cfg["trainer.total_training_steps"] == 50
    assert cfg["trainer.save_freq"] == 2
    assert cfg["rollout.n"] == 1
    assert cfg["rollout.temperature"] == 1.0
    assert cfg["rollout.max_response_length"] == 512
    assert cfg["task.experience_max_length"] == 4096
    assert cfg["model.dtype"] == "float32" and cfg["model.attn_implementation"] is None  # no GPU
    assert cfg["ray.address"] is None and cfg["ray.gpus_per_node"] == 0


def test_defaults_follow_the_reference():
    got = as_dict(dry_run(["--model", "m", "--exp_name", "e", "--system_prompt_type", "medmcqa"]))
    assert got["trainer.lr"] == "1e-6"
    assert got["loss.kl_topk"] == "256"
    assert got["loss.kl_loss_type"] == "full"
    assert got["loss.support_mode"] == "partial"
    assert got["loss.kl_merge_indice"] == "false"
    assert got["rollout.n"] == "1"
    assert got["rollout.max_response_length"] == "1024"  # launchers.md: 1024 for system prompts
    assert got["task.experience_max_length"] == "4096"
    assert got["trainer.total_training_steps"] == "50"
    assert got["trainer.save_freq"] == "2"
    assert "task.context_path" not in got  # the task preset's system prompt file


def test_passthrough_overrides_come_last_and_win():
    extra = ["trainer.lr=1e-5", "rollout.top_p=0.9", "trainer.micro_batch_size=4"]
    overrides = dry_run(MEDMCQA_L31 + extra)
    assert overrides[-3:] == extra
    cfg = resolved(MEDMCQA_L31 + extra)
    assert cfg["trainer.lr"] == pytest.approx(1e-5)
    assert cfg["rollout.top_p"] == 0.9
    assert cfg["trainer.micro_batch_size"] == 4


def test_first_unknown_argument_starts_the_passthrough():
    # `--save_freq 4` after the unknown word is not parsed: it goes to opcd verbatim with the rest.
    overrides = dry_run(["--model", "m", "--exp_name", "e", "--system_prompt_type", "safety",
                         "rollout.top_k=20", "--save_freq", "4"])
    assert overrides[-3:] == ["rollout.top_k=20", "--save_freq", "4"]
    assert as_dict(overrides)["trainer.save_freq"] == "2"


def test_cfg_only_puts_cfg_right_after_distill():
    proc = run_script(MEDMCQA_L31, dry_run=True, cfg_only=True)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout)[1:3] == ["distill", "--cfg"]


@pytest.mark.parametrize("flag", ["--model", "--exp_name", "--system_prompt_type"])
def test_missing_required_flag(flag):
    args = list(MEDMCQA_L31)
    i = args.index(flag)
    del args[i:i + 2]
    proc = run_script(args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "required" in lines[0], proc.stderr


def test_flag_without_value_is_an_error():
    proc = run_script(["--model", "m", "--exp_name", "e", "--system_prompt_type", "safety", "--kl_topk"])
    assert proc.returncode == 2 and "--kl_topk" in proc.stderr


def test_renorm_and_tail_together_are_refused():
    proc = run_script(MEDMCQA_L31 + ["--kl_renorm_topk", "True", "--kl_tail_bucket", "true"])
    assert proc.returncode == 2
    assert "--kl_renorm_topk" in proc.stderr and "--kl_tail_bucket" in proc.stderr


def test_tail_bucket_extension_and_boolean_spellings():
    assert as_dict(dry_run(MEDMCQA_L31 + ["--kl_tail_bucket", "True"]))["loss.support_mode"] == "tail"
    assert as_dict(dry_run(MEDMCQA_L31 + ["--kl_renorm_topk", "true"]))["loss.support_mode"] == "renorm"
    assert as_dict(dry_run(MEDMCQA_L31 + ["--kl_renorm_topk", "False"]))["loss.support_mode"] == "partial"
    assert as_dict(dry_run(MEDMCQA_L31 + ["--kl_merge_indice", "True"]))["loss.kl_merge_indice"] == "true"
    proc = run_script(MEDMCQA_L31 + ["--kl_merge_indice", "maybe"])
    assert proc.returncode == 2 and "--kl_merge_indice" in proc.stderr


def test_bad_system_prompt_type():
    proc = run_script(["--model", "m", "--exp_name", "e", "--system_prompt_type", "math"])
    assert proc.returncode == 2 and "--system_prompt_type" in proc.stderr


def test_equals_form_and_ref_model_equal_to_model():
    got = as_dict(dry_run(["--model=Qwen/Qwen2.5-7B-Instruct", "--ref_model_path", "Qwen/Qwen2.5-7B-Instruct",
                           "--exp_name=e", "--system_prompt_type=safety", "--actor_lr=2e-6"]))
    assert got["model.path"] == "Qwen/Qwen2.5-7B-Instruct" and got["trainer.lr"] == "2e-6"
    assert "model.teacher_path" not in got


def test_multi_node_joins_the_ray_cluster():
    args = [a if a != "1" or MEDMCQA_L31[i - 1] != "--nnodes" else "2" for i, a in enumerate(MEDMCQA_L31)]
    got = as_dict(dry_run(args))
    assert got["ray.address"] == "auto" and got["ray.nnodes"] == "2"
    cfg = resolved(args)
    assert cfg["ray.address"] == "auto" and cfg["ray.nnodes"] == 2
    proc = run_script(MEDMCQA_L31 + ["--nnodes", "0"])
    assert proc.returncode == 2 and "--nnodes" in proc.stderr


def test_gpu_node_keeps_bf16_and_flash_attention():
    overrides = dry_run(MEDMCQA_L31, gpus=8)
    got = as_dict(overrides)
    assert got["ray.gpus_per_node"] == "8"
    assert "model.dtype" not in got and "model.attn_implementation" not in got  # auto: bf16; the hf preset's
    cfg = resolved(MEDMCQA_L31, gpus=8)
    assert cfg["model.dtype"] == "bfloat16" and cfg["model.attn_implementation"] == "flash_attention_2"
    assert cfg["ray.gpus_per_node"] == 8


def test_wandb_logger_when_key_present_and_key_never_printed():
    secret = "wandb-secret-value-1234567890"
    proc = run_script(MEDMCQA_L31, extra_env={"WANDB_API_KEY": secret})
    assert proc.returncode == 0, proc.stderr
    assert as_dict(shlex.split(proc.stdout)[2:])["trainer.loggers"] == "[console,jsonl,wandb]"
    assert secret not in proc.stdout + proc.stderr
    proc = run_script(MEDMCQA_L31, dry_run=False, cfg_only=True, extra_env={"WANDB_API_KEY": secret})
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["trainer"]["loggers"] == ["console", "jsonl", "wandb"]
    assert secret not in proc.stdout + proc.stderr


def test_awkward_strings_reach_opcd_as_strings(tmp_path):
    # A numeric-looking run name and a context path with spaces and a quote stay strings.
    context = tmp_path / "my prompts" / "it's.txt"
    args = ["--model", "m", "--exp_name", "5e-6", "--system_prompt_type", "medmcqa", "--exp_path", str(context)]
    cfg = resolved(args)
    assert cfg["trainer.exp_name"] == "5e-6"
    assert cfg["task.context_path"] == str(context)


def test_help_lists_flags_with_defaults():
    proc = run_script(["--help"])
    assert proc.returncode == 0
    for flag in ("--model", "--ref_model_path", "--kl_renorm_topk", "--kl_tail_bucket", "--system_prompt_type"):
        assert flag in proc.stdout


def test_bad_values_stop_the_script():
    proc = run_script(MEDMCQA_L31, gpus=None, extra_env={"OPCD_NUM_GPUS": "eight"})
    assert proc.returncode == 2 and "OPCD_NUM_GPUS" in proc.stderr and proc.stdout == ""
    proc = run_script(["--model", "m", "--exp_name", "it's \"odd\"", "--system_prompt_type", "safety"])
    assert proc.returncode == 2 and "quote" in proc.stderr and proc.stdout == ""
    proc = run_script(MEDMCQA_L31 + ["--kl_topk", "many"])
    assert proc.returncode == 2 and "--kl_topk" in proc.stderr
