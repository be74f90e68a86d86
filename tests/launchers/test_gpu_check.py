"""tools/gpu_check.py without running its stages: arguments, the stage runner's statuses under a time budget,
and the summary files (the stages themselves run in the CPU smoke mode, `tools/gpu_check.py --cpu`)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import gpu_check  # noqa: E402 (tools/ is not a package)


def test_defaults_write_to_out_and_pick_the_model_size_by_mode(monkeypatch):
    monkeypatch.setenv("OUT", "/somewhere")
    args = gpu_check.parse_args([])
    assert (args.out, args.model_size, args.stages) == ("/somewhere", "1.7b", list(gpu_check.STAGES))
    monkeypatch.delenv("OUT")
    args = gpu_check.parse_args(["--cpu", "--stages", "tests,loss"])
    assert (args.out, args.model_size, args.stages) == ("gpu_check", "tiny", ["tests", "loss"])


@pytest.mark.parametrize("argv, message", [
    (["--stages", "tests,nope"], "unknown nope"),
    (["--budget-s", "0"], "--budget-s 0.0"),
    (["--model-size", "7b"], "invalid choice"),
])
def test_bad_arguments_are_refused_with_the_value(argv, message, capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(argv)
    assert message in capsys.readouterr().err


def test_stages_pass_fail_time_out_and_are_skipped_when_the_budget_is_spent(tmp_path):
    python = sys.executable
    with open(tmp_path / "log", "w") as log:
        budget = gpu_check.Budget(30)
        ok = gpu_check.stage("ok", [[python, "-c", "print('hi')"]], 20, budget, log, lambda: {"x": 1})
        failed = gpu_check.stage("bad", [[python, "-c", "import sys; print('boom'); sys.exit(3)"],
                                         [python, "-c", "print('never')"]], 20, budget, log)
        slow = gpu_check.stage("slow", [[python, "-c", "import time; print('started', flush=True); time.sleep(30)"]],
                               3, budget, log)
        spent = gpu_check.stage("late", [[python, "-c", "print(1)"]], 20, gpu_check.Budget(0), log)
    assert (ok.status, ok.figures) == ("passed", {"x": 1})
    assert failed.status == "failed" and "boom" in failed.tail
    assert slow.status == "timeout" and 2.5 < slow.seconds < 10
    assert spent.status == "skipped"
    assert "\nnever\n" not in (tmp_path / "log").read_text()  # a failed stage's next command does not run


def test_summary_is_one_json_and_one_markdown_table(tmp_path):
    stages = [gpu_check.StageResult("environment", "passed", figures={"torch": "2.11", "gpu": "H200"}),
              gpu_check.StageResult("step", "passed", 120.0, figures={
                  "opcd": {"tokens_per_s": 5000.0, "median_s_per_step": 3.3},
                  "trl": {"tokens_per_s": 2600.0, "median_s_per_step": 6.3}, "ratio_opcd_over_trl": 1.92}),
              gpu_check.StageResult("tests", "failed", 80.0, figures={"tests": 10, "failures": 1}, tail="E  boom"),
              gpu_check.StageResult("loss", "passed", 9.0, figures=[
                  {"vocab": 49152, "fused": {"memory_ratio": 0.11, "time_ratio": 0.93}}])]
    summary = {"mode": "gpu", "started_utc": "2026-12-01 00:00:00", "seconds": 200.0, "budget_s": 450.0, "ok": False,
               "stages": [gpu_check.asdict(s) for s in stages]}
    gpu_check.write_summary(summary, tmp_path)
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == summary
    md = (tmp_path / "gpu_check.md").read_text()
    assert "NOT all stages passed" in md
    assert "| step | passed | 120 | opcd: 5000 tok/s, 3.30 s/step; trl: 2600 tok/s, 6.30 s/step; opcd/TRL 1.92x |" in md
    assert "| environment | passed | 0 | torch 2.11, gpu H200 |" in md
    assert "| loss | passed | 9 | V=49152 fused vs naive: memory 0.11x, time 0.93x |" in md
    assert "## tests: failed" in md and "E  boom" in md
