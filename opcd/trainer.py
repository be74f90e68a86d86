"""The single-controller OPCD trainer: the algorithm, one worker-group call per phase.

    for each step:
        rollout   the student samples responses to prompts WITHOUT the context (current weights),
                  recording its own top-k ids at every position (a game source plays whole episodes)
        teacher   the frozen teacher scores the same tokens WITH the context: log-probs at the support
        update    the student minimises the top-k reverse KL to the teacher (one optimiser step)
        sync      the rollout engine gets the new weights (free for the colocated `hf` engine); a vLLM
                  engine on GPU sleeps from the end of the rollout to the sync (opcd/rollout/__init__.py)
        log, checkpoint   with several ranks written in the background (trainer.async_save) and published
                          at the end of the first step that finds every rank's report in (at the latest at
                          the next checkpoint or the end of the run)

Departures from the reference: the student's top-k ids come from the rollout itself instead of a
second student forward pass; the default support mode is `tail` (a true KL) rather than the partial
sum; the data position and optimiser state are checkpointed, so a resumed run continues exactly.
"""

from __future__ import annotations

import logging
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from opcd import metrics as M
from opcd.runs.checkpoint import (begin_checkpoint, has_optimizer, publish_checkpoint, read_trainer_state,
                                  resumable_checkpoint, retain, unpublished_on_failure, written_checksums,
                                  written_reports)
from opcd.config import LossConfig, TrainerConfig
from opcd.errors import TrainingError
from opcd.loss.objective import uses_sampled_token
from opcd.protocol import Generation, RolloutBatch, SamplingParams, ScoreRequest, TeacherScores, UpdateBatch
from opcd.runs.folder import disk_full_as_enospc
from opcd.data.seeds import step_seed
from opcd.runs.tracking import Tracker
from opcd.workers.base import ModelWorker
from opcd.workers.frozen import FrozenModelWorker
from opcd.workers.student import StudentWorker

log = logging.getLogger("opcd")
# After a failure, how long the driver waits for the ranks still writing a checkpoint in the background
# before leaving it unpublished (they write on their own threads, even when stuck in a collective).
PUBLISH_AFTER_FAILURE_S = 120.0


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class PendingCheckpoint:
    """A checkpoint some ranks are still writing in the background: published by `Trainer.finish_save`."""
    step: int
    folder: Path  # the hidden folder being written (opcd/runs/checkpoint.py begin_checkpoint)
    trainer_state: dict  # taken at its step: the data position moves on while it is written
    writing: list[int]  # the ranks writing in the background; each reports in the folder when done
    known: dict[str, str]  # checksums the other ranks returned at once


class Trainer:
    def __init__(self, cfg: TrainerConfig, loss_cfg: LossConfig, sampling: SamplingParams, source, student,
                 teacher, run_dir: Path, objective: str | None = None):
        self.cfg = cfg
        self.loss_cfg = loss_cfg
        self.objective = objective or loss_cfg.kl_loss_type  # off-policy: forward_kl | seqkd
        self.sampling = sampling
        self.source = source  # a RolloutSource (opcd/domains/sources.py): what each step learns from
        self.student = student  # worker group: rollout engine colocated with the trainable model
        self.teacher = teacher
        self.run_dir = Path(run_dir)
        self.consecutive_skipped = 0
        self.pending: PendingCheckpoint | None = None

    # -- the loop --------------------------------------------------------------------------------
    def fit(self, tracker: Tracker, start_step: int, evaluate=None) -> int:
        """Train to the last step; `evaluate(step) -> metrics` runs every trainer.eval_freq steps. A
        checkpoint written in the background is published after the first step that finds it written,
        before the next one starts, and before this returns; when the run fails, the ranks get up to
        PUBLISH_AFTER_FAILURE_S to finish it (they write on threads of their own), else it stays
        unpublished and the previous checkpoint is the one a rerun resumes from."""
        step = start_step
        try:
            for step in range(start_step + 1, self.cfg.total_training_steps + 1):
                metrics = self.step(step)
                if evaluate is not None and self.cfg.eval_freq > 0 and step % self.cfg.eval_freq == 0:
                    metrics.update(evaluate(step))
                stop = self._nonfinite_stop(metrics, step)
                if stop is None and self._checkpoint_due(step):
                    start = time.perf_counter()
                    self.save(step)
                    metrics[M.TIMING_SAVE] = time.perf_counter() - start
                elif self.pending is not None and self._written(self.pending, wait_s=0):
                    self.finish_save()
                tracker.log(metrics, step)
                if stop is not None:
                    raise stop
        except BaseException:
            self._publish_after_failure()
            raise
        self.finish_save()
        return step

    def step(self, step: int) -> dict[str, float]:
        timer = PhaseTimer()
        with timer("step"):
            with timer("rollout"):
                batch: RolloutBatch = self.source.rollout(step, self._generate, self.sampling, self._seed(step))
                self.student.call(StudentWorker.sleep_rollout)  # its memory goes to the teacher's scoring and the update
            with timer("teacher"):
                scores = self._teacher_scores(batch)
            with timer("update"):
                stats = self.student.gather(StudentWorker.update, self._update_batch(batch, scores))
            with timer("sync"):
                self.student.call(StudentWorker.sync_rollout)
        return {**self._step_metrics(batch, scores, stats, timer.seconds), **self._gpu_memory()}

    # -- phases' inputs ----------------------------------------------------------------------------
    def _teacher_scores(self, batch: RolloutBatch) -> TeacherScores:
        """The teacher's log-probs at the support: stored with the batch (off-policy shards), not needed
        (no teacher: sequence-level KD trains on the tokens alone), or computed now."""
        generation = batch.generation
        if batch.teacher_scores is not None:
            return batch.teacher_scores
        if self.teacher is None:
            support = self._support(generation)
            return TeacherScores(logprobs=torch.zeros(support.shape), entropy=torch.zeros(generation.response_ids.shape),
                                 support_ids=support)
        support = self._support(generation)
        scores = self.teacher.gather(FrozenModelWorker.score_request, ScoreRequest(batch.teacher_prompts, generation.response_ids,
                                                                    generation.response_mask, support,
                                                                    self._merge_topk()))
        if scores.support_ids is None:  # not merged: the ranks left the ids we sent them out of their answer
            scores.support_ids = support
        return scores

    def _generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> Generation:
        return self.student.generate(prompts, params, seed)

    def _seed(self, step: int) -> int:
        return step_seed(self.cfg.seed, step)

    def _support(self, generation: Generation) -> torch.Tensor | None:
        """The ids the teacher scores: sampled tokens, the student's top-k, or None (whole vocabulary)."""
        if uses_sampled_token(self.objective):
            return generation.response_ids.unsqueeze(-1)  # [B, T, 1]
        if self.loss_cfg.kl_topk <= 0:
            return None
        return generation.topk_ids  # [B, T, k]

    def _merge_topk(self) -> int:
        return self.loss_cfg.kl_topk if self.loss_cfg.kl_merge_indice else 0

    def _update_batch(self, batch: RolloutBatch, scores: TeacherScores) -> UpdateBatch:
        generation = batch.generation
        return UpdateBatch(
            prompt_ids=batch.student_prompts, response_ids=generation.response_ids,
            response_mask=generation.response_mask, support_ids=scores.support_ids,
            support_mask=scores.support_mask, teacher_logprobs=scores.logprobs,
            num_tokens=int(generation.trained_mask.sum()), num_sequences=len(batch.student_prompts),
            loss_mask=generation.loss_mask)

    # -- logging -----------------------------------------------------------------------------------
    def _step_metrics(self, batch: RolloutBatch, scores: TeacherScores, stats: dict,
                      seconds: dict[str, float]) -> dict[str, float]:
        generation = batch.generation
        mask = generation.trained_mask
        tokens = int(mask.sum())
        lengths = generation.response_lengths.float()
        sequences = len(batch.student_prompts)
        out = {
            M.LOSS_KL: stats["loss"], M.STUDENT_MASS: stats["student_mass"], M.TEACHER_MASS: stats["teacher_mass"],
            M.ACTOR_ENTROPY: stats["entropy"], M.ACTOR_GRAD_NORM: stats["grad_norm"], M.ACTOR_LR: stats["lr"],
            M.ACTOR_SKIPPED: stats["skipped"],
            M.TEACHER_ENTROPY: float((scores.entropy * mask).sum() / max(tokens, 1)),
            M.ROLLOUT_RESPONSE_LENGTH: float(lengths.mean()),
            M.ROLLOUT_CLIPPED: float((lengths >= self.sampling.max_new_tokens).float().mean()),
            M.ROLLOUT_PROMPT_LENGTH: sum(map(len, batch.student_prompts)) / sequences,
            M.ROLLOUT_TEACHER_PROMPT_LENGTH: sum(map(len, batch.teacher_prompts)) / sequences,
            M.PERF_TOKENS_PER_S: tokens / max(seconds["step"], 1e-9),
            M.PERF_MAX_RSS_GB: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
        out.update(batch.metrics)  # a source's own figures win (a game knows per-turn clipping)
        out.update({f"{M.TIMING}{phase}": value for phase, value in seconds.items()})
        return out

    def _gpu_memory(self) -> dict[str, float]:
        """Each group's peak GPU memory over this step and the device's memory in use after each phase, its
        largest rank's (opcd/runtime/gpu_memory.py); {} on CPU."""
        out = {}
        for name, group in (("student", self.student), ("teacher", self.teacher)):
            readings = [r for r in (group.call(ModelWorker.gpu_memory) if group is not None else []) if r]
            for key in readings[0] if readings else {}:
                out[M.PERF_GPU.format(group=name, reading=key)] = max(r[key] for r in readings)
        used = [value for key, value in out.items() if "_gpu_used_gb_after_" in key]
        if used:
            out[M.PERF_GPU_USED_MAX] = max(used)
        return out

    def _nonfinite_stop(self, metrics: dict[str, float], step: int) -> TrainingError | None:
        """The error that ends the run after too many skipped (non-finite) steps in a row, else None."""
        self.consecutive_skipped = self.consecutive_skipped + 1 if metrics[M.ACTOR_SKIPPED] else 0
        if self.consecutive_skipped < self.cfg.max_consecutive_nonfinite:
            return None
        return TrainingError(f"step {step}: {self.consecutive_skipped} consecutive steps had a non-finite "
                             f"gradient norm (trainer.max_consecutive_nonfinite="
                             f"{self.cfg.max_consecutive_nonfinite}); lower trainer.lr or check the data")

    # -- checkpoints -------------------------------------------------------------------------------
    def _checkpoint_due(self, step: int) -> bool:
        last = step == self.cfg.total_training_steps
        return last or (self.cfg.save_freq > 0 and step % self.cfg.save_freq == 0)

    def save(self, step: int) -> Path | None:
        """Checkpoint `step` (after publishing the one still being written, if any). With trainer.async_save
        and several ranks the ranks copy their shards to host memory and return; the writing goes on while
        the next steps train and `finish_save` publishes it. -> the published folder, None while pending."""
        self.finish_save()
        state = {"step": step, "sampler": self.source.state_dict(), "consecutive_skipped": self.consecutive_skipped,
                 "seed": self.cfg.seed}
        export = self.cfg.hf_export == "every" or (self.cfg.hf_export == "last" and step == self.cfg.total_training_steps)
        tmp = begin_checkpoint(self.run_dir, step)
        with unpublished_on_failure(self.run_dir, step, tmp), disk_full_as_enospc(tmp):
            # torch.save on a full disk says "enforce fail", not ENOSPC: disk_full_as_enospc tells them apart
            answers = self.student.call(StudentWorker.start_save, str(tmp), export, self.cfg.async_save)
        self.pending = PendingCheckpoint(step, tmp, state, writing=[r for r, a in enumerate(answers) if a is None],
                                         known=_merged(answers))
        return None if self.pending.writing else self.finish_save()

    def finish_save(self) -> Path | None:
        """Wait for the ranks writing the pending checkpoint, then publish it. -> its folder, or None when
        none was pending."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        if pending.writing:
            with unpublished_on_failure(self.run_dir, pending.step, pending.folder):
                errors = [e for e in self.student.call(StudentWorker.finish_save) if e]  # a dead rank raises here
                if errors and not self._written(pending, wait_s=0):  # not even its report could be written
                    raise TrainingError(f"checkpoint {pending.step} was not written: {errors[0]}")
        return self._publish(pending)

    def _publish(self, pending: PendingCheckpoint) -> Path:
        """Publish a written checkpoint (the ranks' checksums, trainer state, COMPLETE, rename, pointer:
        opcd/runs/checkpoint.py) and apply retention."""
        with unpublished_on_failure(self.run_dir, pending.step, pending.folder), disk_full_as_enospc(pending.folder):
            written = written_checksums(pending.folder, pending.writing, pending.step)
            folder = publish_checkpoint(self.run_dir, pending.step, pending.folder, {**pending.known, **written},
                                        pending.trainer_state)
        retain(self.run_dir, pending.step, self.cfg.keep_last_n)
        return folder

    def _written(self, pending: PendingCheckpoint, wait_s: float) -> bool:
        """Whether every rank writing `pending` has reported (done or failed), waiting up to `wait_s`."""
        deadline = time.monotonic() + wait_s
        while len(written_reports(pending.folder, pending.writing)) < len(pending.writing):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        return True

    def _publish_after_failure(self) -> None:
        """The run is failing: publish the checkpoint being written if its ranks finish within
        PUBLISH_AFTER_FAILURE_S, without calling them (some may be stuck in a collective); else leave it."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        if not self._written(pending, PUBLISH_AFTER_FAILURE_S):
            log.warning("checkpoint %d was still being written when the run failed: left unpublished", pending.step)
            return
        try:
            self._publish(pending)
        except Exception as exc:  # the run's own error is the one to report
            log.warning("checkpoint %d could not be published: %s", pending.step, exc)

    def resume(self) -> int:
        """Load the newest intact checkpoint of the run folder; returns the step to continue after."""
        if self.cfg.resume == "never":
            return 0
        found = resumable_checkpoint(self.run_dir, log.warning)
        if found is None:
            return 0
        step, folder = found
        state = read_trainer_state(folder)
        optimizer = has_optimizer(folder)
        if not optimizer:  # a fallback past a damaged newest checkpoint: older ones keep no optimizer state
            log.warning("%s holds no optimizer state (only the newest checkpoint keeps it): AdamW restarts its "
                        "moments, so this resume is not exact", folder)
        self.student.call(StudentWorker.load, str(folder), optimizer)
        self.source.load_state_dict(state.get("sampler", {}))
        self.consecutive_skipped = int(state.get("consecutive_skipped", 0))
        return step


def _merged(per_rank: list[dict[str, str] | None]) -> dict[str, str]:
    """The checksums each rank computed for the checkpoint files it wrote."""
    return {rel: digest for part in per_rank if part for rel, digest in part.items()}
