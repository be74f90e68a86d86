"""`opcd distill`: on-policy context distillation, from a validated config to a trained run folder.

The run is set up on the driver (opcd/pipelines/run_setup.py and domain_setup.py: models, tokenizers,
context, the domain's data or game) before Ray starts; then the student and teacher groups are placed, the
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
from opcd.pipelines.run_setup import Prepared, eval_sampling, prepare, rollout_sampling
from opcd.pipelines.worker_setup import (engine_ranks, frozen_spec, naming_last_checkpoint, reserved_pools,
                                         student_context, teacher_ranks)
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
from opcd.workers.spec import WorkerSpec
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
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    with naming_last_checkpoint(run_dir), \
            reserved_pools({"student": cfg.ray.ranks_per_group, "teacher": teacher_ranks(cfg.ray)}, cfg.ray) as pools:
        student, teacher = _place_groups(cfg, prepared, pools, objective)
        try:
            trainer = Trainer(cfg.trainer, cfg.loss, rollout_sampling(cfg.rollout, cfg.loss), source or prepared.source,
                              student, teacher if teacher_scores_needed else None, run_dir, objective)
            start_step = trainer.resume()
            _trim_metrics(run_dir, start_step)
            tracker = _tracker(cfg, start_step)
            evaluations = Evaluations(cfg, prepared, tracker, _load_results(run_dir) if start_step else {})
            try:
                evaluations.before_training(student, teacher)
                tracker.start_progress()  # after the evaluation before training: rate and ETA count steps only
                final_step = trainer.fit(tracker, start_step, evaluations.during_training(student))
                tracker.end_progress()
                evaluations.after_training(student, final_step)
            finally:
                tracker.close()
        finally:
            student.shutdown()
            teacher.shutdown()
    return _finish(run_dir, final_step, evaluations.results)


def _place_groups(cfg: DistillConfig, prepared: Prepared, pools, objective: str | None):
    """The student group (trainable model + its rollout engine) and the frozen teacher group, on their pools."""
    student = WorkerGroup("student", StudentWorker,
                          {"spec": WorkerSpec.from_config(cfg, prepared.student_path, objective=objective,
                                                          max_model_len=student_context(prepared.domain, cfg.task,
                                                                                        cfg.rollout))},
                          world_size=cfg.ray.ranks_per_group, pool=pools["student"],
                          collective_timeout_s=cfg.ray.collective_timeout_s, ranks_per_engine=engine_ranks(cfg.rollout))
    # a padded teacher scores over the student's ids (opcd/workers/scoring.py); its held-out
    # evaluation generates with the configured engine (vLLM per rank), not with the sharded model
    teacher = WorkerGroup("teacher", FrozenModelWorker,
                          {"spec": frozen_spec(cfg, prepared.teacher_path, prepared.domain,
                                               prepared.student_vocab_rows)},
                          world_size=teacher_ranks(cfg.ray), pool=pools["teacher"],
                          collective_timeout_s=cfg.ray.collective_timeout_s, ranks_per_engine=engine_ranks(cfg.rollout))
    check_shared_storage(cfg.run_dir, [student, teacher])
    return student, teacher


def _tracker(cfg: DistillConfig, start_step: int) -> Tracker:
    tracker = Tracker(cfg.trainer.loggers, cfg.run_dir, exp_name=cfg.trainer.exp_name,
                      config=json.loads(json.dumps(_plain(cfg))), total_steps=cfg.trainer.total_training_steps,
                      start_step=start_step, wandb_project=cfg.trainer.wandb_project)
    if start_step:
        tracker.message(f"resumed {cfg.run_dir} from step {start_step}")
    return tracker


class Evaluations:
    """The run's held-out evaluations: before training (the student without the context, the teacher
    with it), every trainer.eval_freq steps, and after training; each one recorded in eval.json,
    eval_<who>.jsonl and the tracker. A resumed run keeps the results it already has."""

    def __init__(self, cfg: DistillConfig, prepared: Prepared, tracker: Tracker, results: dict):
        self.cfg, self.domain, self.tracker, self.results = cfg, prepared.domain, tracker, results
        self.params, self.seed = eval_sampling(cfg.rollout), eval_seed(cfg.trainer.seed)

    def run(self, who: str, group, side: str, step: int | None = None) -> dict:
        result = self.domain.evaluate(who, group, side, self.params, self.seed)
        if step is not None:
            result.extra["step"] = step  # the checkpoint it scored: `opcd export RUN best` counts it
        self.results[who] = _record_eval(result, self.cfg.run_dir, self.results, self.tracker)
        return self.results[who]

    def before_training(self, student, teacher) -> None:
        if not self.cfg.trainer.eval_before or "student_before" in self.results:
            return
        self.tracker.message("evaluating the student (no context) and the teacher (context) on the held-out "
                             "set before training (trainer.eval_before=false skips it)")
        for who, group, side in (("student_before", student, "student"), ("teacher_with_context", teacher, "teacher")):
            self.tracker.message(_describe(self.run(who, group, side)))
        teacher.call(FrozenModelWorker.release_rollout)  # the teacher only scores from here on

    def during_training(self, student):
        """`evaluate(step) -> metrics` for Trainer.fit."""
        def evaluate(step: int) -> dict:
            return {M.EVAL_DURING: self.run(f"student_step_{step}", student, "student")["score"]}
        return evaluate

    def after_training(self, student, final_step: int) -> None:
        if self.cfg.trainer.eval_after:
            self.tracker.message("evaluating the trained student (no context) on the held-out set "
                                 "(trainer.eval_after=false skips it)")
            self.tracker.message(_describe(self.run("student_after", student, "student", step=final_step)))
        self.tracker.summary({f"eval/{k}/score": v["score"] for k, v in self.results.items()})


def _finish(run_dir: Path, final_step: int, results: dict) -> dict:
    """The report (a convenience: a plotting problem must not fail a finished run) and summary.json."""
    report = None
    try:
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
