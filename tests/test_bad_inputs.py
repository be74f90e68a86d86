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
    ("rollout.temperature=0", "config rollout.temperature=0.0: expected a float > 0"),
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
