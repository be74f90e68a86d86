"""`opcd distill`: on-policy context distillation, from a validated config to a trained run folder.

The run is set up on the driver (opcd/pipelines/run_setup.py: models, tokenizers, context, the
domain's data or game) before Ray starts; then the student and teacher groups are placed, the
trainer runs, and the held-out evaluations, metrics, checkpoints and report are written.

    opcd distill                                   # CPU demo: SmolLM2-135M learns to answer in French
    opcd distill task=medmcqa model=hf model.path=Qwen/Qwen2.5-7B-Instruct trainer=paper
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from opcd.runs.checkpoint import latest_checkpoint, write_text_atomic
from opcd.config import DistillConfig, to_yaml
from opcd.runs.results import EvalResult
from opcd import metrics as M
from opcd.pipelines.run_setup import (Prepared, engine_ranks, frozen_context, generation_spec, naming_last_checkpoint,
                                      prepare, reserved_pools, sampling, student_context, teacher_ranks, train_spec)
from opcd.runs.report import write_report
from opcd.runs.folder import claims_run_folder
from opcd.data.files import read_json, read_jsonl
from opcd.data.seeds import eval_seed
from opcd.domains.sources import RolloutSource
from opcd.runs.tracking import Tracker
from opcd.trainer import Trainer
from opcd.workers.frozen import FrozenModelWorker
from opcd.workers.group import WorkerGroup, init_ray
from opcd.workers.shared_storage import check_shared_storage
from opcd.workers.student import StudentWorker

log = logging.getLogger("opcd")


@claims_run_folder  # lock, resume=never history, changed-settings check, complete-run detection
def run_distill(cfg: DistillConfig, prepared: Prepared | None = None, source: RolloutSource | None = None,
                objective: str | None = None, teacher_scores_needed: bool = True) -> dict:
    """On-policy distillation; the off-policy baseline (opcd/pipelines/offpolicy.py) reuses it with a
    shard `source`, its `objective` (offpolicy.objective: forward_kl, seqkd) and possibly no teacher
    scoring."""
    run_dir = cfg.run_dir
    prepared = prepared or prepare(cfg)
    source = source or prepared.source
    student_path, teacher_path = prepared.student_path, prepared.teacher_path
    params, seed = sampling(cfg, evaluation=True), eval_seed(cfg.trainer.seed)

    def run_eval(who: str, group, side: str) -> EvalResult:
        return prepared.domain.evaluate(who, group, side, params, seed)

    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))

    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    with naming_last_checkpoint(run_dir), \
            reserved_pools({"student": cfg.ray.ranks_per_group, "teacher": teacher_ranks(cfg)}, cfg.ray) as pools:
        student = WorkerGroup("student", StudentWorker,
                              {"spec": generation_spec(cfg, student_path, student_context(cfg, prepared.domain)),
                               "train": train_spec(cfg, objective)},
                              world_size=cfg.ray.ranks_per_group, pool=pools["student"],
                              collective_timeout_s=cfg.ray.collective_timeout_s, ranks_per_engine=engine_ranks(cfg))
        # a padded teacher scores over the student's ids (opcd/workers/scoring.py); its held-out
        # evaluation generates with the configured engine (vLLM per rank), not with the sharded model
        teacher = WorkerGroup("teacher", FrozenModelWorker,
                              {"spec": generation_spec(cfg, teacher_path, frozen_context(cfg, prepared.domain),
                                                       vocab_rows=prepared.student_vocab_rows)},
                              world_size=teacher_ranks(cfg), pool=pools["teacher"],
                              collective_timeout_s=cfg.ray.collective_timeout_s, ranks_per_engine=engine_ranks(cfg))
        check_shared_storage(run_dir, [student, teacher])
        trainer = Trainer(cfg.trainer, cfg.loss, sampling(cfg, evaluation=False), source, student,
                          teacher if teacher_scores_needed else None, run_dir, objective)
        start_step = trainer.resume()
        _trim_metrics(run_dir, start_step)
        tracker = Tracker(cfg.trainer.loggers, run_dir, cfg.trainer.exp_name, json.loads(json.dumps(_plain(cfg))),
                          cfg.trainer.total_training_steps, start_step, cfg.trainer.wandb_project)
        if start_step:
            tracker.message(f"resumed {run_dir} from step {start_step}")
        results = _load_results(run_dir) if start_step else {}
        try:
            if cfg.trainer.eval_before and "student_before" not in results:
                tracker.message("evaluating the student (no context) and the teacher (context) on the held-out "
                                "set before training (trainer.eval_before=false skips it)")
                for who, group, side in (("student_before", student, "student"), ("teacher_with_context", teacher, "teacher")):
                    results[who] = _record_eval(run_eval(who, group, side), run_dir, results, tracker)
                    tracker.message(_describe(results[who]))
                teacher.call("release_rollout")  # the teacher only scores from here on

            def evaluate_during(step: int) -> dict:
                result = _record_eval(run_eval(f"student_step_{step}", student, "student"), run_dir, results, tracker)
                results[f"student_step_{step}"] = result
                return {M.EVAL_DURING: result["score"]}
            tracker.start_progress()  # after the evaluation before training: rate and ETA count steps only
            final_step = trainer.fit(tracker, start_step, evaluate_during)
            tracker.end_progress()
            if cfg.trainer.eval_after:
                tracker.message("evaluating the trained student (no context) on the held-out set "
                                "(trainer.eval_after=false skips it)")
                after = run_eval("student_after", student, "student")
                after.extra["step"] = final_step  # the checkpoint it scored: `opcd export RUN best` counts it
                results["student_after"] = _record_eval(after, run_dir, results, tracker)
                tracker.message(_describe(results["student_after"]))
            tracker.summary({f"eval/{k}/score": v["score"] for k, v in results.items()})
        finally:
            tracker.close()
            student.shutdown()
            teacher.shutdown()
    report = None
    try:  # the report is a convenience: a plotting problem must not fail a finished run
        report = write_report([run_dir])["out"]
    except Exception as exc:  # noqa: BLE001
        log.warning("could not write the report of %s: %s", run_dir, exc)
    summary = {"run_dir": str(run_dir), "final_step": final_step, "eval": results, "report": report,
               "checkpoint": str(latest_checkpoint(run_dir)[1]) if latest_checkpoint(run_dir) else None}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


def _record_eval(result: EvalResult, run_dir: Path, results: dict, tracker: Tracker) -> dict:
    with open(run_dir / f"eval_{result.who}.jsonl", "w") as fh:
        for sample in result.samples:
            fh.write(json.dumps(sample, ensure_ascii=False) + "\n")
    write_text_atomic(run_dir / "eval.json", json.dumps({**results, result.who: result.summary()}, indent=1))
    tracker.table(f"eval/{result.who}/samples", result.samples)
    return result.summary()


def _load_results(run_dir: Path) -> dict:
    path = run_dir / "eval.json"
    return read_json(path, expected="a JSON object of evaluations") if path.is_file() else {}


def _describe(result: dict) -> str:
    return (f"eval {result['who']}: score {result['score']:.3f} over {result['num_items']} items "
            f"({result['mean_response_tokens']:.1f} tokens/response)")


def _trim_metrics(run_dir: Path, start_step: int) -> None:
    """A resumed run re-logs the steps after its checkpoint: drop those lines from metrics.jsonl (and a
    last line cut short by a crash, with a warning; a line damaged otherwise is one error line)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [row for row in read_jsonl(path, ("step",), warn=log.warning)
            if isinstance(row["step"], int) and row["step"] <= start_step]
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))


def _plain(cfg: DistillConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)
