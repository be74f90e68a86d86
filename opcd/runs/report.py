"""`opcd report RUN_DIR [RUN_DIR...]`: what the paper shows for one or more runs, from their files.

Read per run (whatever exists): `metrics.jsonl` (training curves and in-training evaluations),
`eval.json` (before/after evaluations of `opcd distill`), `evaluation/results.json` (every
checkpoint, the best-k mean and the baselines, written by `opcd evaluate`).

Written to the output folder: `training.png` (KL, entropies, support mass, grad norm, rollout score,
response length; one line per run; the teacher's held-out score with the context as a dashed reference
on the score panels), `checkpoints.png` (held-out task metric per checkpoint: `opcd evaluate`'s, else
the evaluations `opcd distill` ran before, during and after training; baselines and the teacher as
dashed horizontal lines), `report.md` and `report.html` (the same tables and images; a column no run
has a value for is left out). Several runs side by side compare e.g. OPCD, the off-policy baseline and
the base model.
"""

from __future__ import annotations

import csv
import html
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from opcd import metrics as M
from opcd.runs.checkpoint import write_text_atomic
from opcd.data.files import read_json, read_jsonl, read_text
from opcd.errors import DataError
from opcd.runs.plots import pyplot, save

log = logging.getLogger("opcd")

CURVES = [(M.LOSS_KL, "KL loss"), (M.ACTOR_ENTROPY, "student entropy"), (M.TEACHER_ENTROPY, "teacher entropy"),
          (M.STUDENT_MASS, "student mass in support"), (M.ACTOR_GRAD_NORM, "grad norm"),
          (M.ROLLOUT_SCORE, "rollout score"), (M.ROLLOUT_RESPONSE_LENGTH, "response length"),
          (M.EVAL_DURING, "held-out score (in training)")]


@dataclass
class RunData:
    name: str
    folder: Path
    metrics: list[dict] = field(default_factory=list)  # metrics.jsonl rows
    evals: dict = field(default_factory=dict)  # eval.json
    checkpoints: dict[int, float] = field(default_factory=dict)  # step -> score (opcd evaluate)
    best: dict | None = None  # best-k summary
    baselines: dict[str, float] = field(default_factory=dict)
    ood: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # name -> lm-eval task -> metric
    # items behind each score (eval.json's who, evaluation's step_<k> / base_*): scores over 8 items and
    # over 40 are not the same evidence
    items: dict[str, int] = field(default_factory=dict)

    def last(self, key: str) -> float | None:
        values = [row[key] for row in self.metrics if row.get(key) is not None]
        return values[-1] if values else None

    def eval_score(self, who: str) -> float | None:
        result = self.evals.get(who)
        return result.get("score") if isinstance(result, dict) else None

    def held_out_by_step(self) -> dict[int, float]:
        """Held-out score per checkpoint step: `opcd evaluate`'s when it ran, else opcd distill's own
        evaluations (before training = step 0, every trainer.eval_freq steps, after training at the last
        step), so a run fresh from `opcd distill` has a curve too."""
        if self.checkpoints:
            return dict(self.checkpoints)
        points = {}
        for who, result in self.evals.items():
            if not isinstance(result, dict) or result.get("score") is None:
                continue
            if who == "student_before":
                points[0] = result["score"]
            elif who.startswith("student_step_") and who[len("student_step_"):].isdigit():
                points[int(who[len("student_step_"):])] = result["score"]
            elif who == "student_after":
                step = result.get("step", self.metrics[-1].get("step") if self.metrics else None)
                if isinstance(step, int):
                    points[step] = result["score"]
        return dict(sorted(points.items()))

    def references(self) -> dict[str, float]:
        """Horizontal reference lines: the base model's scores from `opcd evaluate`, and the teacher's
        held-out score with the context from `opcd distill` (what the student is distilled towards)."""
        lines = {name.replace("_", " "): score for name, score in self.baselines.items()}
        teacher = self.eval_score("teacher_with_context")
        if teacher is not None:
            lines["teacher with context"] = teacher
        return lines


def load_run(folder: str | Path) -> RunData:
    folder = Path(folder)
    if not (folder / "config.yaml").is_file():
        raise DataError(f"{folder} is not an opcd run folder (no config.yaml)")
    run = RunData(folder.name, folder)
    if (folder / "metrics.jsonl").is_file():
        run.metrics = read_jsonl(folder / "metrics.jsonl", ("step",), warn=log.warning)
        bad = next((row for row in run.metrics if not isinstance(row["step"], int)), None)
        if bad is not None:
            raise DataError(f"{folder / 'metrics.jsonl'}: step {bad['step']!r}, expected an integer step")
    if (folder / "eval.json").is_file():
        run.evals = read_json(folder / "eval.json", expected="a JSON object of evaluations")
        run.items.update({who: v["num_items"] for who, v in run.evals.items()
                          if isinstance(v, dict) and isinstance(v.get("num_items"), int)})
    table_csv = folder / "evaluation" / "results.csv"
    if table_csv.is_file():
        rows = csv.DictReader(io.StringIO(read_text(table_csv)))
        run.items.update({row["name"]: int(row["num_items"]) for row in rows
                          if isinstance(row.get("name"), str) and (row.get("num_items") or "").isdigit()})
    results = folder / "evaluation" / "results.json"
    if results.is_file():
        _read_results(run, results)
    return run


def _read_results(run: RunData, path: Path) -> None:
    """evaluation/results.json (written by `opcd evaluate`): checkpoint scores, best-k, baselines, ood."""
    table = read_json(path, expected="a JSON object with 'checkpoints'")
    try:
        run.checkpoints = {int(k): _number(v) for k, v in table.get("checkpoints", {}).items()}
        run.baselines = {str(k): _number(v) for k, v in table.get("baselines", {}).items()}
    except (AttributeError, TypeError, ValueError):
        raise DataError(f"{path}: 'checkpoints' and 'baselines' must map steps/names to scores") from None
    best, ood = table.get("best"), table.get("ood", {})
    if best is not None and not (isinstance(best, dict) and isinstance(best.get("steps"), list)
                                 and isinstance(best.get("mean"), (int, float)) and isinstance(best.get("std"), (int, float))):
        raise DataError(f"{path}: 'best' must be an object with 'mean', 'std' and 'steps'")
    if not isinstance(ood, dict) or not all(isinstance(t, dict) and all(isinstance(m, dict) for m in t.values())
                                            for t in ood.values()):
        raise DataError(f"{path}: 'ood' must map model -> task -> metric -> value")
    run.best, run.ood = best, ood


def _number(value) -> float:
    """A score as written (a JSON number, or "nan"/"inf" strings some writers leave); non-finite stays so."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(value)
    return float(value)


def plot_training(runs: list[RunData], path: Path) -> Path | None:
    fig = training_figure(runs)
    return None if fig is None else save(fig, path)


def training_figure(runs: list[RunData]):
    """The training curves' figure (None when no run has any), one panel per metric."""
    curves = [(key, label) for key, label in CURVES if any(r.last(key) is not None for r in runs)]
    if not curves:
        return None
    plt = pyplot()
    cols = 3
    rows = (len(curves) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), dpi=110, squeeze=False)
    for ax, (key, label) in zip(axes.flat, curves):
        for run in runs:
            points = [(row["step"], _as_float(row[key])) for row in run.metrics if row.get(key) is not None]
            points = [(step, value) for step, value in points if value is not None]
            if points:
                # NaN is a gap in the line; a non-finite value (written as "nan"/"inf") is marked on the axis
                line, = ax.plot([s for s, _ in points], [v if math.isfinite(v) else math.nan for _, v in points],
                                marker="o" if len(points) < 20 else None, markersize=3, label=run.name)
                bad = [s for s, v in points if not math.isfinite(v)]
                if bad:
                    ax.plot(bad, [0.0] * len(bad), linestyle="none", marker="x", color=line.get_color(),
                            transform=ax.get_xaxis_transform(), clip_on=False,
                            label=f"{run.name}: non-finite ({len(bad)} steps)")
                    ax.legend(fontsize=7)
            teacher = run.eval_score("teacher_with_context")
            if key in (M.ROLLOUT_SCORE, M.EVAL_DURING) and teacher is not None:
                ax.axhline(teacher, linestyle="--", color="gray", linewidth=1,
                           label=f"{run.name}: teacher with context, held-out ({teacher:.3g})")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    for ax, (key, _) in zip(axes.flat, curves):
        if key in (M.ROLLOUT_SCORE, M.EVAL_DURING) or ax is axes.flat[0]:
            ax.legend(fontsize=7)
    return fig


def _as_float(value) -> float | None:
    """A metric as a number: JSON numbers, and the "nan"/"inf"/"-inf" strings tracking writes for
    non-finite values (opcd/runs/tracking.py); anything else is not drawn."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return float(value)
    return None


def plot_checkpoints(runs: list[RunData], path: Path) -> Path | None:
    if not any(r.held_out_by_step() for r in runs):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=110)
    styles = iter(["--", ":", "-."] * 10)
    for run in runs:
        points = run.held_out_by_step()
        if points:
            ax.plot(list(points), list(points.values()), marker="o", label=run.name)
        for name, score in run.references().items():
            ax.axhline(score, linestyle=next(styles), color="gray", linewidth=1,
                       label=f"{run.name}: {name} ({score:.3f})")
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("task metric (no context)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, path)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _count(n: int | None) -> str:
    return "" if n is None else f" (n={n})"


def summary_tables(runs: list[RunData]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) tables shared by the Markdown and HTML reports. A score is followed by the
    number of items behind it, "(n=40)", where the run's files record it."""
    overview = []
    for run in runs:
        best = run.best or {}
        evals = {k: v.get("score") for k, v in run.evals.items() if isinstance(v, dict)}
        best_items = {run.items.get(f"step_{s}") for s in best.get("steps", [])}
        overview.append([run.name, _fmt(run.metrics[-1]["step"] if run.metrics else None), _fmt(run.last(M.LOSS_KL))]
                        + [_fmt(evals.get(who)) + _count(run.items.get(who) if who in evals else None)
                           for who in ("student_before", "teacher_with_context", "student_after")]
                        + [_fmt(best.get("mean")) + (f" ± {best['std']:.3g} (steps {best['steps']})" if best else "")
                           + _count(best_items.pop() if best and len(best_items) == 1 else None)]
                        + [_fmt(run.baselines.get(name))
                           + _count(run.items.get(name) if name in run.baselines else None)
                           for name in ("base_without_context", "base_with_context")])
    tables = [("Runs", *_without_empty_columns(
        ["run", "last step", "last KL", "student before", "teacher with context", "student after",
         "best-k mean of checkpoints", "base without context", "base with context"], overview))]
    for run in runs:
        if run.checkpoints:
            tables.append((f"{run.name}: checkpoints", ["step", "score", "items"],
                           [[str(s), _fmt(run.checkpoints[s]), _fmt(run.items.get(f"step_{s}"))]
                            for s in sorted(run.checkpoints)]))
        if run.ood:
            rows = [[name, task, metric, _fmt(value)] for name, tasks in run.ood.items()
                    for task, metrics in tasks.items() for metric, value in metrics.items()
                    if not metric.endswith("_stderr")]
            tables.append((f"{run.name}: out-of-distribution (lm-eval)", ["model", "task", "metric", "value"], rows))
    return tables


def _without_empty_columns(header: list[str], rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """The table without the columns no row has a value in (e.g. the baselines before `opcd evaluate`)."""
    keep = [i for i in range(len(header)) if i == 0 or any(row[i] for row in rows)]
    return [header[i] for i in keep], [[row[i] for i in keep] for row in rows]


def _markdown(tables, images: list[Path]) -> str:
    lines = ["# opcd report", ""]
    for title, header, rows in tables:
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    lines += [f"![{p.stem}]({p.name})" for p in images]
    return "\n".join(lines) + "\n"


def _html(tables, images: list[Path]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>opcd report</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}</style>",
             "</head><body><h1>opcd report</h1>"]
    for title, header, rows in tables:
        parts.append(f"<h2>{html.escape(title)}</h2><table><tr>"
                     + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts += [f"<p><img src='{html.escape(p.name)}' alt='{html.escape(p.stem)}'></p>" for p in images]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> dict:
    runs = [load_run(d) for d in run_dirs]
    out = Path(out) if out else runs[0].folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = [p for p in (plot_training(runs, out / "training.png"), plot_checkpoints(runs, out / "checkpoints.png"))
              if p is not None]
    tables = summary_tables(runs)
    write_text_atomic(out / "report.md", _markdown(tables, images))
    write_text_atomic(out / "report.html", _html(tables, images))
    return {"out": str(out), "files": sorted(p.name for p in out.iterdir())}
