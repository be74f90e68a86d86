"""The text-game, off-policy and OEL launchers keep the reference's command lines (seed-README.txt,
launchers.md) and map them onto valid opcd configs (checked with --cfg: composed and validated,
no model loaded)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.launchers.test_published_commands import overrides

ROOT = Path(__file__).resolve().parents[2]
SOKOBAN = ("--model Qwen/Qwen3-4B-Instruct-2507 --exp_name sokoban-q3-4b-ins-lr5e-6 --nnodes 1 --kl_loss_type full "
           "--kl_topk 256 --actor_lr 5e-6 --max_response_length 1024 --experience_max_length 8192 "
           "--textgame_name Sokoban-v0 --textgame_max_steps 5 --textgame_no_think True "
           "--exp_path experiences/sokoban_sample.txt")
FROZENLAKE = ("--model Qwen/Qwen3-1.7B --exp_name frozenlake-q3-1b7-think-lr5e-6 --nnodes 1 --kl_loss_type full "
              "--kl_topk 256 --actor_lr 5e-6 --max_response_length 1024 --experience_max_length 8192 "
              "--textgame_name FrozenLake-v0-raw --textgame_max_steps 5 --textgame_no_think False "
              "--exp_path experiences/frozenlake_sample.txt")


def _run(script: str, *args: str, cfg: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "OPCD_NUM_GPUS": "0", ("OPCD_CFG_ONLY" if cfg else "OPCD_DRY_RUN"): "1", **(env or {})}
    full.pop("WANDB_API_KEY", None)
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *args], env=full, capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_textgame_consolidate_reference_commands():
    sokoban = overrides(_run("textgame_consolidate.sh", *shlex.split(SOKOBAN)))
    assert sokoban["_command"] == "distill" and sokoban["task"] == "textgame"
    assert sokoban["game.name"] == "Sokoban-v0" and sokoban["game.max_steps"] == "5"
    assert sokoban["task.enable_thinking"] == "false" and sokoban["game.episodes_per_step"] == "64"
    assert sokoban["rollout.temperature"] == "0.7" and "task.max_prompt_length" not in sokoban  # derived: preset
    frozen = overrides(_run("textgame_consolidate.sh", *shlex.split(FROZENLAKE)))
    assert frozen["game.name"] == "FrozenLake-v0-raw" and frozen["task.enable_thinking"] == "true"


@pytest.mark.parametrize("script", ["textgame_consolidate.sh", "textgame_generate_offp.sh"])
def test_textgame_launchers_resolve_to_valid_configs(script):
    result = _run(script, *shlex.split(SOKOBAN), cfg=True)
    assert result.returncode == 0, result.stderr
    assert "name: Sokoban-v0" in result.stdout and "name: textgame" in result.stdout


def test_textgame_extract_and_eval():
    reference = overrides(_run("textgame_extract_inturn.sh"))
    assert reference["_command"] == "extract" and reference["game.name"] == "Sokoban-v0"
    assert reference["extract.seeds"] == "[0,1,2,3,4,5,6,7,8,9]" and reference["game.eval_episodes"] == "128"
    assert reference["rollout.max_response_length"] == "1024" and reference["task.enable_thinking"] == "false"
    single = overrides(_run("textgame_extract_inturn.sh", "--model", "m", "--exp_name", "e", "--ckpt", "4",
                             "--textgame_name", "FrozenLake-v0-raw", "--textgame_no_think", "False",
                             "--exp_model_path", "w", "--val_samples_limit", "16"))
    assert single["extract.seeds"] == "[4]" and single["extract.writer_path"] == "w"
    assert single["game.eval_episodes"] == "16" and single["task.enable_thinking"] == "true"
    evaluation = overrides(_run("textgame_eval_inturn.sh", "--model", "m", "--use_bsl", "True"))
    assert evaluation["_command"] == "evaluate --base" and evaluation["game.eval_episodes"] == "128"
    assert evaluation["rollout.eval_temperature"] == "0.7" and evaluation["evaluate.baselines"] == "true"


def test_offpolicy_launchers():
    generate = overrides(_run("math_generate_offp.sh", "--model", "m", "--exp_name", "d", "--exp_path", "e.txt"))
    assert generate["_command"] == "offpolicy generate" and generate["task"] == "math"
    train = overrides(_run("sys_train_offp.sh", "--model", "m", "--exp_name", "t", "--system_prompt_type",
                            "medmcqa", "--off_policy_save_dir", "/tmp/d/off_policy_data", "--kl_loss_type", "seqkd"))
    assert train["_command"] == "offpolicy train" and train["offpolicy.objective"] == "seqkd"
    assert train["offpolicy.save_dir"] == "/tmp/d/off_policy_data" and train["loss.kl_loss_type"] == "full"
    game = overrides(_run("textgame_train_offp.sh", *shlex.split(SOKOBAN), "--off_policy_save_dir", "/x"))
    assert game["offpolicy.objective"] == "forward_kl" and game["game.name"] == "Sokoban-v0"
    missing = _run("textgame_train_offp.sh", *shlex.split(SOKOBAN))
    assert missing.returncode == 2 and "--off_policy_save_dir is required" in missing.stderr
    bad = _run("math_train_offp.sh", "--model", "m", "--exp_name", "t", "--exp_path", "e", "--off_policy_save_dir",
               "/x", "--kl_loss_type", "k3")
    assert bad.returncode == 2 and "must be full (forward KL) or seqkd, got 'k3'" in bad.stderr
    valid = _run("sys_train_offp.sh", "--model", "m", "--exp_name", "t", "--system_prompt_type", "safety",
                 "--off_policy_save_dir", "/x", cfg=True)
    assert valid.returncode == 0 and "objective: forward_kl" in valid.stdout, valid.stderr


def test_oel_deploy_and_consolidation_flags():
    deploy = overrides(_run("textgame_generate_deploy.sh", "--exp_name", "oel", "--resume_policy_name", "sok",
                             "--resume_policy_ckpt", "10", "--oel_round", "2", "--textgame_name", "Sokoban-v0"))
    assert deploy["_command"] == "oel" and deploy["model.path"] == "runs/sok/global_step_10/model"
    assert deploy["oel.phases"] == "[deploy]" and deploy["oel.first_round"] == "2" and deploy["oel.rounds"] == "2"
    consolidate = overrides(_run("textgame_consolidate.sh", *shlex.split(SOKOBAN), "--deploy_save_dir",
                                  "runs/oel/round_2/deploy/"))
    assert consolidate["game.states_path"] == "runs/oel/round_2/deploy/states.jsonl"
    half = _run("textgame_generate_deploy.sh", "--exp_name", "oel", "--resume_policy_name", "sok")
    assert half.returncode == 2 and "go together" in half.stderr
