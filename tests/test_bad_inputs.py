"""Bad user input ends with one line on stderr naming the input and what was expected, exit code 2,
and before any worker starts (these tests never start Ray: the checks run on the driver first)."""

from __future__ import annotations

import json
import shutil

import pytest

from opcd.cli import main


def _run(capsys, *overrides) -> tuple[int, str]:
    code = main(["distill", *overrides])
    err = capsys.readouterr().err.strip()
    return code, err


def _base(tmp_path, tiny_model) -> list[str]:
    return [f"model.path={tiny_model}", f"trainer.runs_dir={tmp_path}/runs", "trainer.loggers=[jsonl]"]


def test_missing_system_prompt_file(tmp_path, tiny_model, capsys):
    code, err = _run(capsys, *_base(tmp_path, tiny_model), f"task.context_path={tmp_path}/nope.txt")
    assert code == 2
    assert err == f"opcd: error: context file not found: {tmp_path}/nope.txt (expected a system-prompt or experience text file)"


def test_empty_system_prompt_file(tmp_path, tiny_model, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    code, err = _run(capsys, *_base(tmp_path, tiny_model), f"task.context_path={tmp_path}/empty.txt")
    assert code == 2 and "context file is empty" in err and "empty.txt" in err


def test_malformed_dataset_row(tmp_path, tiny_model, capsys):
    rows = [{"content": [{"role": "user", "content": "hi"}], "answer": "fr"},
            {"content": "not a list of messages", "answer": "fr"}]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = _run(capsys, *_base(tmp_path, tiny_model), f"task.train_data={path}")
    assert code == 2
    assert "bad.jsonl row 2" in err and "'content'" in err and len(err.splitlines()) == 1


def test_missing_dataset_file(tmp_path, tiny_model, capsys):
    code, err = _run(capsys, *_base(tmp_path, tiny_model), f"task.test_data={tmp_path}/none.parquet")
    assert code == 2 and "none.parquet" in err


def test_teacher_with_another_tokenizer_is_refused(tmp_path, tiny_model, capsys):
    from transformers import AutoTokenizer

    other = tmp_path / "other-teacher"
    shutil.copytree(tiny_model, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<extra_a>", "<extra_b>"])
    tokenizer.save_pretrained(other)
    code, err = _run(capsys, *_base(tmp_path, tiny_model), f"model.teacher_path={other}")
    assert code == 2
    assert "must share one tokenizer" in err and str(other) in err


def test_missing_model_path(tmp_path, capsys):
    code, err = _run(capsys, f"model.path={tmp_path}/no-model", f"trainer.runs_dir={tmp_path}/runs")
    assert code == 2 and f"model path not found: {tmp_path}/no-model" in err


@pytest.mark.parametrize("override, expected", [
    ("trainer.foo=1", "config: unknown key trainer.foo (known keys in trainer: "),
    ("+trainer.foo=1", "config: unknown key trainer.foo (known keys in trainer: "),
    ("loss.kl_topk=abc", "config loss.kl_topk='abc': expected an integer"),
    ("rollout.temperature=0", "config rollout.temperature=0.0: expected a finite float >= 0.0001"),
])
def test_bad_config_values(capsys, override, expected):
    code, err = _run(capsys, override)
    assert code == 2 and expected in err and len(err.splitlines()) == 1


# -- text games, off-policy shards, OEL states (issues 4, 5) -------------------------------------------
def _game(tmp_path, tiny_model) -> list[str]:
    return ["task=textgame", *_base(tmp_path, tiny_model)]


@pytest.mark.parametrize("overrides, expected", [
    (["game.name=Chess-v9"], "opcd: error: unknown text game 'Chess-v9': expected one of FrozenLake-v0, "
                             "FrozenLake-v0-raw, Sokoban-v0 or textarena:<TextArena env id>"),
    (["game.boxes=2"], "opcd: error: game.boxes does not apply to FrozenLake-v0: its settings are game.holes, "
                       "game.size"),
    (["game.size=5"], "opcd: error: FrozenLake size=5 needs at least 8 moves, but the move limit is max_steps=5: "
                      "expected a smaller lake or a larger limit"),
    (["game.name=textarena:Sokoban-v0"], "opcd: error: text game 'textarena:Sokoban-v0' needs the textarena "
                                         "package: pip install 'opcd[textarena]'"),
    (["game.max_steps=0"], "opcd: error: config game.max_steps=0: expected an integer >= 1"),
    (["game.mode=episodes"], "opcd: error: config game.mode='episodes': expected one of turn, trajectory"),
])
def test_bad_game_settings(tmp_path, tiny_model, capsys, overrides, expected):
    if "textarena" in overrides[0]:
        try:
            import textarena  # noqa: F401
            pytest.skip("textarena is installed")
        except ImportError:
            pass
    code, err = _run(capsys, *_game(tmp_path, tiny_model), *overrides)
    assert code == 2 and err == expected
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("global_step_*"))


def test_bad_game_states_file(tmp_path, tiny_model, capsys):
    states = tmp_path / "states.jsonl"
    states.write_text('{"observation": "P _", "remaining": 2, "history": []}\n{"observation": 3}\n')
    code, err = _run(capsys, *_game(tmp_path, tiny_model), f"game.states_path={states}")
    assert code == 2 and err == f"opcd: error: {states}:2: field 'observation' missing or not a str"


def test_offpolicy_train_without_shards(tmp_path, tiny_model, capsys):
    code = main(["offpolicy", "train", *_base(tmp_path, tiny_model), f"offpolicy.save_dir={tmp_path}/none"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (f"opcd: error: {tmp_path}/none: no off-policy shards (no manifest.json); "
                                 f"run 'opcd offpolicy generate' first")


def test_offpolicy_shards_of_another_format(tmp_path, tiny_model, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "manifest.json").write_text('{"format": "opcd-offpolicy-shards", "version": 9}')
    code = main(["offpolicy", "train", *_base(tmp_path, tiny_model), f"offpolicy.save_dir={tmp_path}/d"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"opcd: error: {tmp_path}/d/manifest.json: version 9, this opcd reads version 1"


def test_offpolicy_needs_a_topk(tmp_path, tiny_model, capsys):
    code = main(["offpolicy", "generate", *_base(tmp_path, tiny_model), "loss.kl_topk=0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("opcd: error: config loss.kl_topk=0: expected an integer > 0 for the "
                                        "off-policy baseline")


# -- values that pass a type check and then do harm; names that escape runs_dir (issue 17) -------------
@pytest.mark.parametrize("override, expected", [
    ("rollout.temperature=inf", "config rollout.temperature=inf: expected a finite float >= 0.0001"),
    ("trainer.lr=inf", "config trainer.lr=inf: expected a finite float > 0"),
    ("trainer.lr=nan", "config trainer.lr=nan: expected a finite float > 0"),
    ("rollout.max_response_length=100000000",
     "config rollout.max_response_length=100000000: expected an integer in [1, 1048576]"),
    ("rollout.eval_top_k=-5", "config rollout.eval_top_k=-5: expected an integer >= 0 (0 = off)"),
    ("ray.num_cpus=-1", "config ray.num_cpus=-1.0: expected null (automatic) or a number in (0, 65536]"),
    ("ray.gpus_per_node=-1", "config ray.gpus_per_node=-1: expected an integer >= 0 (0 = CPU only), or null for the GPUs visible here"),
    ("trainer.exp_name=..", "config trainer.exp_name='..': expected a folder name inside trainer.runs_dir"),
    ("trainer.exp_name=.", "config trainer.exp_name='.': expected a folder name inside trainer.runs_dir"),
    ("trainer.exp_name='a/b'", "config trainer.exp_name='a/b': expected a folder name inside trainer.runs_dir"),
])
def test_harmful_values_are_refused_at_start_up(tmp_path, capsys, override, expected):
    """Each of these used to pass: temperature inf trained nothing (KL 0, rc 0), lr inf failed at step
    2, a 1e8-token response hung, eval_top_k -5 failed after training, '..' wrote into runs_dir's parent."""
    code, err = _run(capsys, f"trainer.runs_dir={tmp_path}/runs", override)
    assert code == 2 and err.startswith(f"opcd: error: {expected}") and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides, expected", [
    (["loss.kl_topk=60000"], "config loss.kl_topk=60000: expected at most the model's vocab_size=49152 ({model})"),
    (["rollout.max_response_length=1024"], "config rollout.max_response_length=1024: expected fewer tokens than "
                                           "the model's max_position_embeddings=1024 ({model})"),
    (["rollout.max_response_length=1000", "task.max_prompt_length=2000"],
     "bundled:questions_train row 1: a prompt of 40 tokens plus rollout.max_response_length does not fit the "
     "model's positions (24 tokens left for the prompt): lower task.max_prompt_length to drop such rows, or "
     "rollout.max_response_length"),
    (["task.train_data=bundled:medmcqa_train"], "bundled:medmcqa_train row 1: field 'answer'='B' does not fit "
                                                "task=language: expected null or task.language='fr'"),
])
def test_limits_of_the_model_and_the_task_are_checked_before_models_load(tmp_path, tiny_model, capsys,
                                                                         overrides, expected):
    """kl_topk above the vocabulary and MedMCQA rows under task=language used to fail only after
    both models loaded (or at the first evaluation); prompts longer than the positions trained silently."""
    code, err = _run(capsys, *_base(tmp_path, tiny_model), *overrides)
    assert code == 2 and err == "opcd: error: " + expected.format(model=tiny_model)


def test_unknown_model_type_is_one_line(tmp_path, tiny_model, capsys):
    """Used to be 27 lines of Ray traceback from inside the worker's constructor."""
    model = tmp_path / "odd-model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "llamaXX"}))
    code, err = _run(capsys, *_base(tmp_path, tiny_model), f"model.path={model}")
    assert code == 2 and err.startswith(f"opcd: error: cannot read the model config of {model}: The checkpoint "
                                        f"you are trying to load has model type `llamaXX`")
    assert len(err.splitlines()) == 1


# -- files that are not UTF-8, not valid Unicode, or nested too deeply: one line naming the path -------
def test_non_utf8_context_file(tmp_path, tiny_model, capsys):
    (tmp_path / "latin1.txt").write_bytes("Réponds en français.".encode("latin-1"))
    code, err = _run(capsys, *_base(tmp_path, tiny_model), f"task.context_path={tmp_path}/latin1.txt")
    assert code == 2 and err == (f"opcd: error: {tmp_path}/latin1.txt: not UTF-8 text (byte 0xe9 at offset 1): "
                                 f"expected a UTF-8 file")


@pytest.mark.parametrize("content, expected", [
    (b'{"content": [{"role": "user", "content": "caf\xe9"}], "answer": "fr"}\n',
     "{path}: not UTF-8 text (byte 0xe9 at offset 45): expected a UTF-8 file"),
    (b'{"content": [{"role": "user", "content": "a\\ud800b"}], "answer": "fr"}\n',
     "{path} line 1: text holds a lone surrogate '\\ud800' at character 1 (expected valid Unicode text)"),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", "{path} line 1: JSON nested too deeply to read"),
])
def test_unreadable_dataset_text(tmp_path, tiny_model, capsys, content, expected):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    code, err = _run(capsys, *_base(tmp_path, tiny_model), f"task.train_data={path}")
    assert code == 2 and err == "opcd: error: " + expected.format(path=path)


def test_non_utf8_game_states_file(tmp_path, tiny_model, capsys):
    states = tmp_path / "states.jsonl"
    states.write_bytes(b'{"observation": "\xff", "remaining": 2, "history": []}\n')
    code, err = _run(capsys, *_game(tmp_path, tiny_model), f"game.states_path={states}")
    assert code == 2 and err == (f"opcd: error: {states}: not UTF-8 text (byte 0xff at offset 17): "
                                 f"expected a UTF-8 file")


def test_non_utf8_run_config_for_evaluate(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_bytes(b"trainer:\n  exp_name: caf\xe9\n")
    code = main(["evaluate", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (f"opcd: error: {tmp_path}/run/config.yaml: not UTF-8 text (byte 0xe9 at offset 24): "
                                 f"expected a UTF-8 file")


def test_an_os_error_on_a_users_path_is_one_line(tmp_path, capsys):
    """The CLI's last net for OS errors (no permission, a full disk, a file where a folder should be):
    one line naming the path instead of a traceback."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("trainer: {}\n")
    (tmp_path / "file").write_text("x")
    code = main(["report", str(tmp_path / "run"), "--out", f"{tmp_path}/file/report"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"opcd: error: {tmp_path}/file/report: Not a directory"


def test_offpolicy_manifest_nested_too_deeply(tmp_path, tiny_model, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    code = main(["offpolicy", "train", *_base(tmp_path, tiny_model), f"offpolicy.save_dir={tmp_path}/d"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"opcd: error: {tmp_path}/d/manifest.json: not a JSON manifest (maximum "
                                        f"recursion depth exceeded") and len(err.splitlines()) == 1
