"""Every command of the reference README (seed-README.txt), run through our launchers, resolves (`--cfg`:
composed and validated, no model loaded) to the paper's setting. The sys_consolidate.sh lines are in
test_launchers.py. Where the README says ${BEST_EXP_PATH...} we pass a bundled experience file."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MATH_EXP, SOKOBAN_EXP, FROZEN_EXP = ("experiences/math_sample.txt", "experiences/sokoban_sample.txt",
                                     "experiences/frozenlake_sample.txt")

MATH_CONSOLIDATE = ("--model Qwen/Qwen3-8B --exp_name math-q3-8b-lr5e-6 --nnodes 2 --rollout_n 1 --kl_loss_type full "
                    f"--kl_topk 256 --actor_lr 5e-6 --max_response_length 16384 --exp_path {MATH_EXP}")
MATH_DIST = ("--model Qwen/Qwen3-4B --ref_model_path /tmp/Qwen3-8B --exp_name math-q3-8b-dist-4b-lr5e-6 --nnodes 2 "
             "--rollout_n 1 --kl_loss_type full --kl_topk 256 --actor_lr 5e-6 --max_response_length 16384 "
             f"--exp_path {MATH_EXP}")
MATH_GEN = ("--model Qwen/Qwen3-8B --exp_name math-q3-8b-offp-data --nnodes 2 --rollout_n 1 --kl_loss_type full "
            f"--kl_topk 256 --max_response_length 16384 --exp_path {MATH_EXP}")
MATH_TRAIN = ("--model Qwen/Qwen3-8B --exp_name math-q3-8b-lr5e-6-offp --nnodes 2 --rollout_n 1 --kl_loss_type full "
              f"--kl_topk 256 --actor_lr 5e-6 --exp_path {MATH_EXP} "
              "--off_policy_save_dir /tmp/math-q3-8b-offp-data/off_policy_data --max_response_length 16384")
_GAME = ("--nnodes 1 --kl_loss_type full --kl_topk 256{lr} --max_response_length 1024 --experience_max_length 8192 "
         "--textgame_name {game} --textgame_max_steps 5 --textgame_no_think {no_think} --exp_path {exp}")
SOKO = dict(game="Sokoban-v0", no_think="True", exp=SOKOBAN_EXP)
FROZEN = dict(game="FrozenLake-v0-raw", no_think="False", exp=FROZEN_EXP)
GAME_CONSOLIDATE = {
    "sokoban-q3-4b-ins-lr5e-6": "--model Qwen/Qwen3-4B-Instruct-2507 --exp_name sokoban-q3-4b-ins-lr5e-6 "
                                + _GAME.format(lr=" --actor_lr 5e-6", **SOKO),
    "frozenlake-q3-1b7-think-lr5e-6": "--model Qwen/Qwen3-1.7B --exp_name frozenlake-q3-1b7-think-lr5e-6 "
                                      + _GAME.format(lr=" --actor_lr 5e-6", **FROZEN),
}
GAME_GEN = {
    "sokoban-q3-4b-ins-offp-data": "--model Qwen/Qwen3-4B-Instruct-2507 --exp_name sokoban-q3-4b-ins-offp-data "
                                   + _GAME.format(lr="", **SOKO),
    "frozenlake-q3-1b7-think-offp-data": "--model Qwen/Qwen3-1.7B --exp_name frozenlake-q3-1b7-think-offp-data "
                                         + _GAME.format(lr="", **FROZEN),
}
GAME_TRAIN = {
    "sokoban-q3-4b-ins-lr5e-6-offp": "--model Qwen/Qwen3-4B-Instruct-2507 --exp_name sokoban-q3-4b-ins-lr5e-6-offp "
                                     + _GAME.format(lr=" --actor_lr 5e-6", **SOKO)
                                     + " --off_policy_save_dir /tmp/sokoban-q3-4b-ins-offp-data/off_policy_data",
    "frozenlake-q3-1b7-think-lr5e-6-offp": "--model Qwen/Qwen3-1.7B --exp_name frozenlake-q3-1b7-think-lr5e-6-offp "
                                           + _GAME.format(lr=" --actor_lr 5e-6", **FROZEN)
                                           + " --off_policy_save_dir /tmp/frozenlake-q3-1b7-think-offp-data/off_policy_data",
}
_SYS = ("--model Qwen/Qwen2.5-7B-Instruct --exp_name {name} --nnodes 1 --rollout_n 1 --kl_loss_type full --kl_topk 256 "
        "--actor_lr 5e-6 --max_response_length 512 --experience_max_length 4096 --system_prompt_type medmcqa "
        "--exp_path system_prompts/medmcqa.txt")
SYS_GEN = _SYS.format(name="sys-medmcqa-q25-7b-offp-data")
SYS_TRAIN = (_SYS.format(name="sys-medmcqa-q25-7b-offp")
             + " --off_policy_save_dir /tmp/sys-medmcqa-q25-7b-offp-data/off_policy_data --total_training_steps 50 "
               "--save_freq 2")


def run(script: str, args: str | list[str] = "", *, cfg: bool = False, gpus: int = 0, env: dict | None = None,
        data_dir: Path | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("OPCD_", "WANDB_API_KEY"))}
    full.update({"OPCD_NUM_GPUS": str(gpus), ("OPCD_CFG_ONLY" if cfg else "OPCD_DRY_RUN"): "1",
                 "OPCD_DATA_DIR": str(data_dir or ROOT / "no-such-data-dir")}, **(env or {}))
    words = shlex.split(args) if isinstance(args, str) else args
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *words], env=full, capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def overrides(result) -> dict[str, str]:
    """key -> value of the one printed command (+ "_command": the words before the first override)."""
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)
    head = [w for w in words[1:3] if "=" not in w and not w.startswith(("/", "runs"))]
    return dict(w.split("=", 1) for w in words if "=" in w) | {"_command": " ".join(head)}


def resolved(result) -> dict:
    """The config `--cfg` printed, flattened to dotted keys."""
    assert result.returncode == 0, result.stderr
    return {f"{section}.{key}": value for section, values in yaml.safe_load(result.stdout).items()
            for key, value in values.items()}


def _paper_common(cfg: dict, lr: float = 5e-6) -> None:
    assert cfg["trainer.total_training_steps"] == 50 and cfg["trainer.save_freq"] == 2
    assert cfg["loss.kl_topk"] == 256 and cfg["loss.support_mode"] == "partial" and cfg["rollout.n"] == 1
    assert cfg["trainer.lr"] == pytest.approx(lr)


# -- math ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, model, teacher", [(MATH_CONSOLIDATE, "Qwen/Qwen3-8B", None),
                                                  (MATH_DIST, "Qwen/Qwen3-4B", "/tmp/Qwen3-8B")])
def test_math_consolidate(args, model, teacher):
    cfg = resolved(run("math_consolidate.sh", args, cfg=True, gpus=8))
    _paper_common(cfg)
    assert (cfg["model.path"], cfg["model.teacher_path"]) == (model, teacher)
    assert cfg["task.name"] == "math" and cfg["task.context_path"] == MATH_EXP
    assert cfg["rollout.temperature"] == 0.6 and cfg["rollout.max_response_length"] == 16384
    assert cfg["trainer.batch_size"] == 128 and cfg["ray.nnodes"] == 2 and cfg["ray.address"] == "auto"
    assert cfg["trainer.micro_batch_size"] == 1  # one long sequence per pass bounds the activations
    # the prompt budget grows with the experience budget: a 4,096-token experience is not dropped
    assert cfg["task.experience_max_length"] == 4096 and cfg["task.max_prompt_length"] == 4096 + 1024


def test_math_prompt_budget_follows_the_experience_flag():
    cfg = resolved(run("math_consolidate.sh", MATH_CONSOLIDATE + " --experience_max_length 8000", cfg=True))
    assert cfg["task.max_prompt_length"] == 8000 + 1024


def test_math_offpolicy_generate_and_train_agree_on_the_shard_folder():
    generate, train = overrides(run("math_generate_offp.sh", MATH_GEN)), overrides(run("math_train_offp.sh", MATH_TRAIN))
    assert generate["_command"] == "offpolicy generate" and train["_command"] == "offpolicy train"
    assert generate["offpolicy.save_dir"] == train["offpolicy.save_dir"] == "/tmp/math-q3-8b-offp-data/off_policy_data"
    cfg = resolved(run("math_train_offp.sh", MATH_TRAIN, cfg=True))
    _paper_common(cfg)
    assert cfg["offpolicy.objective"] == "forward_kl" and cfg["rollout.max_response_length"] == 16384
    gen_cfg = resolved(run("math_generate_offp.sh", MATH_GEN, cfg=True))
    assert gen_cfg["offpolicy.save_dir"] == "/tmp/math-q3-8b-offp-data/off_policy_data"
    moved = overrides(run("math_generate_offp.sh", MATH_GEN, env={"OPCD_OFFP_ROOT": "/scratch"}))
    assert moved["offpolicy.save_dir"] == "/scratch/math-q3-8b-offp-data/off_policy_data"


def test_math_extract_no_flags_is_the_reference_setting_and_selects_on_validation(tmp_path):
    for name in ("dapo_train", "dapo_validation", "dapo_test"):
        (tmp_path / f"{name}.parquet").write_bytes(b"")
    result = run("math_extract_inturn.sh", cfg=True, data_dir=tmp_path)
    assert result.stderr.count("\n") <= 1 and "fallback" not in result.stderr
    cfg = resolved(result)
    assert cfg["model.path"] == "Qwen/Qwen3-8B" and cfg["extract.seeds"] == list(range(10))
    assert cfg["extract.stream_items"] == 30 and cfg["extract.heldout_size"] == 900
    assert cfg["extract.writer_sees_previous"] is False and cfg["rollout.max_response_length"] == 16384
    assert cfg["task.train_data"] == f"{tmp_path}/dapo_train.parquet"
    assert cfg["task.validation_data"] == f"{tmp_path}/dapo_validation.parquet"  # not the test split


def _fake_runs(tmp_path: Path, script: str, commands: dict[str, str]) -> Path:
    """runs/<exp_name>/config.yaml as the consolidate script would write it (its --cfg output)."""
    runs = tmp_path / "runs"
    for name, args in commands.items():
        result = run(script, args, cfg=True)
        assert result.returncode == 0, result.stderr
        (runs / name).mkdir(parents=True)
        (runs / name / "config.yaml").write_text(result.stdout)
    return runs


def test_math_eval_no_flags_evaluates_every_published_run_found(tmp_path):
    runs = _fake_runs(tmp_path, "math_consolidate.sh", {"math-q3-8b-lr5e-6": MATH_CONSOLIDATE})
    result = run("math_eval_inturn.sh", env={"OPCD_RUNS_DIR": str(runs)})
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    assert len(commands) == 1 and commands[0][1:3] == ["evaluate", f"{runs}/math-q3-8b-lr5e-6"]
    assert "skipped math-q3-8b-dist-4b-lr5e-6" in result.stderr
    cfg = resolved(run("math_eval_inturn.sh", "--exp_name math-q3-8b-lr5e-6 --ckpt 4", cfg=True,
                       env={"OPCD_RUNS_DIR": str(runs)}))
    assert cfg["evaluate.limit"] == 1000 and cfg["evaluate.steps"] == [4]
    assert (cfg["rollout.eval_temperature"], cfg["rollout.eval_top_p"], cfg["rollout.eval_top_k"]) == (0.6, 0.95, 20)
    empty = run("math_eval_inturn.sh", env={"OPCD_RUNS_DIR": str(tmp_path / "none")})
    assert empty.returncode == 2 and "none of the published runs" in empty.stderr


def test_math_eval_base_model_alone_with_and_without_the_experience():
    got = overrides(run("math_eval_inturn.sh", f"--model Qwen/Qwen3-8B --eval_prepend_experience True --exp_path {MATH_EXP}"))
    assert got["_command"] == "evaluate --base" and got["task"] == "math" and got["model.path"] == "Qwen/Qwen3-8B"
    cfg = resolved(run("math_eval_inturn.sh", f"--model Qwen/Qwen3-8B --eval_prepend_experience True --exp_path {MATH_EXP}",
                       cfg=True))
    assert cfg["evaluate.with_context"] is True and cfg["task.context_path"] == MATH_EXP
    assert cfg["trainer.exp_name"] == "base-Qwen3-8B-math" and cfg["evaluate.limit"] == 1000


# -- text games ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(GAME_CONSOLIDATE))
def test_textgame_consolidate(name):
    cfg = resolved(run("textgame_consolidate.sh", GAME_CONSOLIDATE[name], cfg=True))
    _paper_common(cfg)
    assert cfg["task.experience_max_length"] == 8192 and cfg["task.max_prompt_length"] == 8192 + 5 * 512
    assert cfg["game.episodes_per_step"] == 64 and cfg["rollout.temperature"] == 0.7
    assert cfg["task.enable_thinking"] is name.startswith("frozenlake")
    assert cfg["rollout.max_response_length"] == 1024


def test_textgame_scripts_default_to_the_reference_experience_budget():
    """Regression: textgame_consolidate.sh and the off-policy game scripts defaulted to 4,096 tokens."""
    short = "--model m --exp_name e --exp_path x.txt"
    for script in ("textgame_consolidate.sh", "textgame_generate_offp.sh"):
        assert overrides(run(script, short))["task.experience_max_length"] == "8192", script
    got = overrides(run("textgame_train_offp.sh", short + " --off_policy_save_dir /x"))
    assert got["task.experience_max_length"] == "8192"


@pytest.mark.parametrize("gen, train", zip(sorted(GAME_GEN), sorted(GAME_TRAIN)))
def test_textgame_offpolicy_pairs_agree(gen, train):
    generate = overrides(run("textgame_generate_offp.sh", GAME_GEN[gen]))
    trained = resolved(run("textgame_train_offp.sh", GAME_TRAIN[train], cfg=True))
    assert generate["offpolicy.save_dir"] == trained["offpolicy.save_dir"] == f"/tmp/{gen}/off_policy_data"
    assert trained["task.experience_max_length"] == 8192 and trained["game.name"] == generate["game.name"]
    _paper_common(trained)


def test_textgame_extract_no_flags():
    cfg = resolved(run("textgame_extract_inturn.sh", cfg=True))
    assert cfg["model.path"] == "Qwen/Qwen3-4B-Instruct-2507" and cfg["game.name"] == "Sokoban-v0"
    assert cfg["game.eval_episodes"] == 128 and cfg["extract.seeds"] == list(range(10))
    assert cfg["task.experience_max_length"] == 8192 and cfg["task.max_prompt_length"] == 8192 + 5 * 512


def test_textgame_eval_no_flags_and_run_form(tmp_path):
    runs = _fake_runs(tmp_path, "textgame_consolidate.sh", GAME_CONSOLIDATE)
    result = run("textgame_eval_inturn.sh", env={"OPCD_RUNS_DIR": str(runs)})
    assert result.returncode == 0, result.stderr
    assert [shlex.split(line)[2] for line in result.stdout.splitlines()] == [
        f"{runs}/sokoban-q3-4b-ins-lr5e-6", f"{runs}/frozenlake-q3-1b7-think-lr5e-6"]
    cfg = resolved(run("textgame_eval_inturn.sh", "--exp_name frozenlake-q3-1b7-think-lr5e-6 --use_bsl True",
                       cfg=True, env={"OPCD_RUNS_DIR": str(runs)}))
    assert cfg["game.name"] == "FrozenLake-v0-raw" and cfg["game.eval_episodes"] == 128  # from the run
    assert cfg["evaluate.baselines"] is True and cfg["rollout.eval_temperature"] == 0.7


def test_oel_consolidation_uses_its_round(tmp_path):
    """Regression: --oel_round was checked and then ignored by textgame_consolidate.sh."""
    args = GAME_CONSOLIDATE["sokoban-q3-4b-ins-lr5e-6"] + " --deploy_save_dir runs/sokoban-oel/round_2/deploy --oel_round 2"
    got = overrides(run("textgame_consolidate.sh", args))
    assert got["_command"] == "oel" and got["oel.phases"] == "[consolidate]"
    assert got["oel.first_round"] == got["oel.rounds"] == "2"
    assert got["game.states_path"] == "runs/sokoban-oel/round_2/deploy/states.jsonl"
    cfg = resolved(run("textgame_consolidate.sh", args, cfg=True))
    assert cfg["oel.first_round"] == 2 and cfg["oel.phases"] == ["consolidate"]
    deploy = overrides(run("textgame_generate_deploy.sh", "--model m --exp_name sokoban-oel --oel_round 2"))
    assert deploy["oel.first_round"] == "2" and deploy["oel.phases"] == "[deploy]"


# -- system prompts -----------------------------------------------------------------------------------
def test_sys_offpolicy_pair_agrees():
    generate = overrides(run("sys_generate_offp.sh", SYS_GEN))
    assert generate["offpolicy.save_dir"] == "/tmp/sys-medmcqa-q25-7b-offp-data/off_policy_data"
    cfg = resolved(run("sys_train_offp.sh", SYS_TRAIN, cfg=True))
    assert cfg["offpolicy.save_dir"] == generate["offpolicy.save_dir"]
    _paper_common(cfg)
    assert cfg["rollout.max_response_length"] == 512 and cfg["task.max_prompt_length"] == 4096 + 1024


def test_sys_eval_flags_of_the_reference(tmp_path):
    runs = _fake_runs(tmp_path, "sys_consolidate.sh", {"sys-medmcqa-q25-7b": SYS_TRAIN.replace(
        "sys-medmcqa-q25-7b-offp ", "sys-medmcqa-q25-7b ").split(" --off_policy_save_dir")[0]})
    env = {"OPCD_RUNS_DIR": str(runs)}
    every = run("sys_eval_inturn.sh", env=env)
    assert every.returncode == 0 and len(every.stdout.splitlines()) == 1, every.stderr
    cfg = resolved(run("sys_eval_inturn.sh", "--exp_name sys-medmcqa-q25-7b --eval_prepend_experience True "
                                             "--model Qwen/Qwen2.5-7B-Instruct", cfg=True, env=env))
    assert cfg["evaluate.with_context"] is True and cfg["evaluate.baselines"] is True  # --use_bsl defaults to True
    assert cfg["evaluate.limit"] == 500 and (cfg["rollout.eval_top_p"], cfg["rollout.eval_top_k"]) == (0.8, 20)
    base = resolved(run("sys_eval_inturn.sh", "--model meta-llama/Llama-3.1-8B-Instruct --system_prompt_type safety "
                                              "--eval_prepend_experience True", cfg=True))
    assert base["task.name"] == "safety" and base["model.path"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert base["task.test_data"] == "bundled:safety_test" and base["evaluate.with_context"] is True


def test_ifeval_follows_the_reference_command(tmp_path):
    """The README's lm_eval line: vLLM backend, T 0.7, top-p 0.8, top-k 20, min_p 0, sampled, seed 42,
    chat template, few-shot as multi-turn, thinking off."""
    from opcd.pipelines.ood import simple_evaluate_kwargs

    runs = _fake_runs(tmp_path, "sys_consolidate.sh", {"sys-medmcqa-q25-7b": _SYS.format(name="sys-medmcqa-q25-7b")})
    cfg = resolved(run("sys_eval_inturn.sh", ["--exp_name", "sys-medmcqa-q25-7b", "evaluate.ood_tasks=[ifeval]"],
                       cfg=True, env={"OPCD_RUNS_DIR": str(runs)}))
    assert cfg["evaluate.ood_tasks"] == ["ifeval"] and cfg["evaluate.ood_seed"] == 42
    assert cfg["evaluate.ood_backend"] == "hf"  # no GPU here; vllm where a GPU and vLLM are there
    kwargs = simple_evaluate_kwargs("m", ["ifeval"], None, "vllm", "bfloat16", cfg["evaluate.ood_enable_thinking"],
                                    False, cfg["evaluate.ood_gen_kwargs"], cfg["evaluate.ood_seed"], "cuda")
    assert kwargs["gen_kwargs"] == "temperature=0.7,top_p=0.8,top_k=20,min_p=0,do_sample=True"
    assert kwargs["model_args"]["enable_thinking"] is False and kwargs["batch_size"] == "auto"
    assert kwargs["apply_chat_template"] and kwargs["fewshot_as_multiturn"] and kwargs["random_seed"] == 42
