"""The `opcd` command's help and usage: what a newcomer reads before any run."""

import pytest

from opcd.cli import MAIN_KEYS, main
from opcd.config import DistillConfig
from opcd.config.hints import schema_keys


def _exit(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


@pytest.mark.parametrize("command", [["distill"], ["extract"], ["offpolicy", "generate"], ["oel"]])
def test_help_lists_presets_and_main_keys_and_points_to_cfg(capsys, command):
    code, out, _ = _exit(capsys, *command, "--help")
    assert code == 0
    assert "presets: model=hf|smollm2  rollout=auto|hf|vllm  task=language|math|medmcqa|safety|textgame" in out
    assert "  model.path, model.teacher_path: " in out and "trainer.total_training_steps" in out
    assert "add --cfg (prints the resolved config and exits)" in out


def test_main_keys_in_the_help_exist():
    known = set(schema_keys(DistillConfig))
    for keys, _ in MAIN_KEYS:
        for key in keys.split(", "):
            assert key in known, key


def test_evaluate_usage_shows_overrides_as_optional(capsys):
    """Regression: `opcd evaluate` without arguments said 'required: run_dir, overrides'."""
    code, out, _ = _exit(capsys, "evaluate", "--help")
    assert code == 0
    assert "usage: opcd evaluate [-h] [--cfg] [--base] [RUN_DIR [KEY=VALUE ...] ...]" in out
    assert main(["evaluate"]) == 2
    assert capsys.readouterr().err.strip() == (
        "opcd: error: opcd evaluate needs a run folder (RUN_DIR [KEY=VALUE ...]) or --base [OVERRIDE ...]")


@pytest.mark.parametrize("args", [[b"distill", b"trainer.exp_name=run\xff"], [b"report", b"runs/\xfe\xff"],
                                  [b"evaluate", b"--base", b"model.path=m\xc3"]])
def test_a_non_utf8_argument_is_one_line_before_anything_is_written(tmp_path, args):
    """Bug: a non-UTF-8 byte in an argument crashed inside Ray (UnicodeEncodeError) after config.yaml was
    written. The bytes reach Python as lone surrogates; they are refused first, shown escaped."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable.encode(), b"-m", b"opcd.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, timeout=120)
    err = done.stderr.decode().strip()
    bad = ascii(args[-1])[2:-1]
    assert done.returncode == 2 and err == f"opcd: error: argument '{bad}': not UTF-8 text (expected UTF-8 arguments)"
    assert list(tmp_path.iterdir()) == []
