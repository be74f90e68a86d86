"""The `opcd` command's help and usage: what a newcomer reads before any run."""

import pytest

from opcd.cli import MAIN_KEYS, main
from opcd.config import DistillConfig
from opcd.config_hints import schema_keys


def _exit(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


@pytest.mark.parametrize("command", [["distill"], ["extract"], ["offpolicy", "generate"], ["oel"]])
def test_help_lists_presets_and_main_keys_and_points_to_cfg(capsys, command):
    code, out, _ = _exit(capsys, *command, "--help")
    assert code == 0
    assert "presets: model=hf|smollm2  rollout=hf  task=language|math|medmcqa|safety|textgame" in out
    assert "  model.path, model.teacher_path: " in out and "trainer.total_training_steps" in out
    assert "add --cfg (prints the resolved config and exits)" in out


def test_main_keys_in_the_help_exist():
    known = set(schema_keys(DistillConfig))
    for keys, _ in MAIN_KEYS:
        for key in keys.split(", "):
            assert key in known, key


def test_evaluate_usage_shows_overrides_as_optional(capsys):
    """Regression: `opcd evaluate` without arguments said 'required: run_dir, overrides'."""
    code, _, err = _exit(capsys, "evaluate")
    assert code == 2
    assert "usage: opcd evaluate [-h] run_dir [KEY=VALUE ...]" in err
    assert err.strip().endswith("the following arguments are required: run_dir")


def test_report_prints_no_matplotlib_font_cache_message(tmp_path):
    """Regression: with a fresh (or unwritable) font cache every run logged 'generated new fontManager'."""
    import json
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("trainer:\n  exp_name: x\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss/kl": 0.5}) + "\n")
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "fresh-matplotlib-cache")}
    proc = subprocess.run([sys.executable, "-m", "opcd.cli", "report", str(run)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "fresh-matplotlib-cache").is_dir()  # the cache was built in this run
    assert "fontManager" not in proc.stderr and (run / "report" / "training.png").is_file()


def test_rays_token_auth_notice_is_not_shown():
    """Ray logs this on every new local instance (ray.init -> enable_token_auth_by_default)."""
    import logging

    from ray._private.authentication import authentication_token_setup

    from opcd.quiet import quiet_third_party_logs

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = authentication_token_setup.logger
    logger.addHandler(handler)
    try:
        quiet_third_party_logs()
        authentication_token_setup._warn_token_auth_enabled()
        logger.error("errors still show")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["errors still show"]


def test_the_end_of_a_run_says_where_the_report_is(capsys):
    from opcd.cli import _print_run_end

    _print_run_end({"run_dir": "runs/x", "checkpoint": "runs/x/global_step_3", "report": "runs/x/report"})
    assert capsys.readouterr().out.splitlines() == [
        "run folder: runs/x  last checkpoint: runs/x/global_step_3",
        "report: runs/x/report/report.html (also report.md and PNG plots; `opcd report RUN_DIR ...` compares runs)"]
