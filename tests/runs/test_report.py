"""`opcd report` from run folders written by hand: plots, tables, several runs side by side."""

from __future__ import annotations

import json

import pytest

from opcd.cli import main
from opcd.runs.report import load_run, summary_tables, write_report


def _run(folder, kl: list[float], checkpoints: dict[int, float] | None = None, baselines: dict | None = None):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("trainer:\n  exp_name: x\n")
    rows = [{"step": i + 1, "loss/kl": v, "actor/entropy": 1.0 - 0.1 * i, "rollout/score": 0.1 * i}
            for i, v in enumerate(kl)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "loss')
    (folder / "eval.json").write_text(json.dumps({"student_before": {"score": 0.1}, "student_after": {"score": 0.6}}))
    if checkpoints is not None:
        (folder / "evaluation").mkdir()
        best = sorted(checkpoints.values(), reverse=True)[:3]
        (folder / "evaluation" / "results.json").write_text(json.dumps({
            "checkpoints": {str(k): v for k, v in checkpoints.items()},
            "best": {"k": 3, "mean": sum(best) / 3, "std": 0.01, "steps": [2, 4, 6]},
            "baselines": baselines or {}}))
    return folder


def test_report_of_two_runs_side_by_side(tmp_path, capsys):
    a = _run(tmp_path / "opcd", [0.5, 0.3, 0.2], {2: 0.5, 4: 0.7, 6: 0.6},
             {"base_without_context": 0.1, "base_with_context": 0.8})
    b = _run(tmp_path / "offp", [0.9, 0.8, 0.85])
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"training.png", "checkpoints.png", "report.md", "report.html"}
    for png in ("training.png", "checkpoints.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    text = (out / "report.md").read_text()
    # no run has a teacher score: that column is left out, not shown empty
    assert "| run | last step | last KL | student before | student after | best-k mean" in text
    assert "| opcd | 3 | 0.2 | 0.1 | 0.6 | 0.6 ± 0.01 (steps [2, 4, 6]) | 0.1 | 0.8 |" in text
    assert "| offp | 3 | 0.85 |" in text and "## opcd: checkpoints" in text and "## offp: checkpoints" not in text
    assert "<td>0.6 ± 0.01 (steps [2, 4, 6])</td>" in (out / "report.html").read_text()


def test_a_truncated_metrics_line_is_skipped_and_missing_files_are_fine(tmp_path):
    run = _run(tmp_path / "r", [0.4])
    data = load_run(run)
    assert len(data.metrics) == 1 and data.checkpoints == {}
    (title, header, rows), = summary_tables([data])
    assert rows[0][:3] == ["r", "1", "0.4"]
    result = write_report([run])
    # without `opcd evaluate` the held-out curve is opcd distill's own: before (step 0), after (last step)
    assert data.held_out_by_step() == {0: 0.1, 1: 0.6}
    assert result["out"] == str(run / "report") and "checkpoints.png" in result["files"]


def test_not_a_run_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"opcd: error: {tmp_path} is not an opcd run folder (no config.yaml)"


def test_best_k_mean_known_numbers():
    from opcd.runs.results import best_k_mean

    summary = best_k_mean({2: 0.5, 4: 0.7, 6: 0.6, 8: 0.2, 10: 0.7}, 3)
    assert summary["steps"] == [4, 10, 6] and summary["mean"] == pytest.approx(2.0 / 3)
    assert summary["std"] == pytest.approx(((0.7 - 2 / 3) ** 2 * 2 + (0.6 - 2 / 3) ** 2) ** 0.5 / 3 ** 0.5)


def test_scores_show_how_many_items_they_are_over(tmp_path):
    """Regression: a score over 40 items sat beside one over 8 with nothing to tell them apart."""
    run = _run(tmp_path / "r", [0.4], {2: 0.5, 4: 0.75, 6: 0.25}, {"base_without_context": 0.1})
    (run / "eval.json").write_text(json.dumps({"student_before": {"score": 0.1, "num_items": 40},
                                               "teacher_with_context": {"score": 0.85, "num_items": 40},
                                               "student_after": {"score": 0.6, "num_items": 40}}))
    (run / "evaluation" / "results.csv").write_text(
        "name,step,score,num_items\nstep_2,2,0.5000,8\nstep_4,4,0.7500,8\nstep_6,6,0.2500,8\n"
        "base_without_context,,0.1000,8\n")
    overview, checkpoints = summary_tables([load_run(run)])
    assert overview[2][0][3:] == ["0.1 (n=40)", "0.85 (n=40)", "0.6 (n=40)",
                                  "0.5 ± 0.01 (steps [2, 4, 6]) (n=8)", "0.1 (n=8)"]
    assert checkpoints[1] == ["step", "score", "items"]
    assert checkpoints[2] == [["2", "0.5", "8"], ["4", "0.75", "8"], ["6", "0.25", "8"]]


def test_a_fresh_demo_run_has_a_checkpoint_plot_a_teacher_line_and_no_empty_columns(tmp_path):
    """Regression: right after `opcd distill` the report had three empty columns (the baselines and
    best-k of `opcd evaluate`), no teacher reference, and no checkpoints.png although the README
    promised one."""
    run = _run(tmp_path / "demo", [0.3, 0.2, 0.1])
    (run / "eval.json").write_text(json.dumps({
        "student_before": {"score": 0.0, "num_items": 40}, "teacher_with_context": {"score": 0.75, "num_items": 40},
        "student_step_2": {"score": 0.5, "num_items": 40}, "student_after": {"score": 0.7, "num_items": 40, "step": 3}}))
    data = load_run(run)
    assert data.held_out_by_step() == {0: 0.0, 2: 0.5, 3: 0.7}
    assert data.references() == {"teacher with context": 0.75}
    (title, header, rows), = summary_tables([data])
    assert header == ["run", "last step", "last KL", "student before", "teacher with context", "student after"]
    assert rows == [["demo", "3", "0.1", "0 (n=40)", "0.75 (n=40)", "0.7 (n=40)"]]
    result = write_report([run])
    assert {"training.png", "checkpoints.png", "report.md", "report.html"} <= set(result["files"])
    assert "![checkpoints](checkpoints.png)" in (run / "report" / "report.md").read_text()
    # opcd evaluate's scores, when there, replace distill's own; the teacher line stays beside the baselines
    (run / "evaluation").mkdir()
    (run / "evaluation" / "results.json").write_text(json.dumps(
        {"checkpoints": {"2": 0.4, "3": 0.6}, "baselines": {"base_without_context": 0.0}}))
    data = load_run(run)
    assert data.held_out_by_step() == {2: 0.4, 3: 0.6}
    assert data.references() == {"base without context": 0.0, "teacher with context": 0.75}


@pytest.mark.parametrize("name, content, message", [
    ("metrics.jsonl", b'{"step": 1, "lo\n{"step": 2}\n', "metrics.jsonl:1: not valid JSON"),
    ("metrics.jsonl", b'{"step": 1}\n{"loss/kl": 0.2}\n', "metrics.jsonl:2: no 'step'; expected a JSON object with 'step'"),
    ("metrics.jsonl", b'{"step": 1}\n3\n{"step": 2}\n', "metrics.jsonl:2: a JSON int, expected a JSON object"),
    ("metrics.jsonl", b'{"step": "one"}\n', "metrics.jsonl: step 'one', expected an integer step"),
    ("metrics.jsonl", b'{"step": 1, "x": "\xff"}\n', "metrics.jsonl: not UTF-8 text (byte 0xff"),
    ("eval.json", b'{"student_before": {"sco', "eval.json: not valid JSON"),
    ("eval.json", b"", "eval.json: empty file"),
    ("eval.json", b"[1, 2]", "eval.json: holds a JSON list, expected a JSON object"),
    ("eval.json", b'{"x": "\xc3"}', "eval.json: not UTF-8 text"),
    ("evaluation/results.json", b'{"checkpoints": {"2": 0.', "results.json: not valid JSON"),
    ("evaluation/results.json", b"", "results.json: empty file"),
    ("evaluation/results.json", b'{"checkpoints": [0.5]}', "results.json: 'checkpoints' and 'baselines' must map"),
    ("evaluation/results.json", b'{"checkpoints": {}, "best": 3}', "results.json: 'best' must be an object"),
    ("evaluation/results.json", b'{"checkpoints": {"\xff": 1}}', "results.json: not UTF-8 text"),
    ("evaluation/results.csv", b"name,num_items\n\xff,3\n", "results.csv: not UTF-8 text"),
])
def test_damaged_run_files_are_one_line_and_exit_2(tmp_path, capsys, name, content, message):
    """Bug: `opcd report` traced back (JSONDecodeError, KeyError: 'step', AttributeError, UnicodeDecodeError)
    on damaged metrics.jsonl / eval.json / results files instead of naming the file and what was expected."""
    run = _run(tmp_path / "r", [0.4, 0.3], {2: 0.5})
    (run / name).write_bytes(content)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("opcd: error: ") and message in err and "\n" not in err, err
    assert "Traceback" not in err


def test_a_torn_last_metrics_line_is_one_warning(tmp_path, caplog):
    run = _run(tmp_path / "r", [0.4, 0.3])  # _run ends metrics.jsonl with a torn line
    assert main(["report", str(run)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{run / 'metrics.jsonl'}:3: last line cut short (a crash while writing?); skipped it, "
                        f"the 2 lines before it are read"]


def test_non_finite_metrics_are_gaps_on_a_numeric_axis_and_marked(tmp_path):
    """Bug: `"nan"` metrics (tracking writes non-finite values as strings) were drawn on a categorical axis,
    so a curve appeared to rise when its values fell."""
    import math

    from opcd.runs.report import training_figure

    run = _run(tmp_path / "r", [0.5, 0.4, 0.3])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[:3]]
    rows[1]["loss/kl"] = "nan"
    rows[2]["loss/kl"] = "inf"
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = training_figure([load_run(run)])
    kl = next(ax for ax in fig.axes if ax.get_title() == "KL loss")
    curve, marks = kl.get_lines()[:2]
    ys = list(curve.get_ydata())
    assert ys[0] == 0.5 and math.isnan(ys[1]) and math.isnan(ys[2])  # numbers, with gaps
    assert list(marks.get_xdata()) == [2, 3] and marks.get_label() == "r: non-finite (2 steps)"
    assert kl.yaxis.get_units() is None  # not a category axis
    write_report([run])  # and the whole report still draws
