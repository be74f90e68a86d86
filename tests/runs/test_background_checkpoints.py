"""Checkpoints written in the background (trainer.async_save, several ranks): the driver publishes one
only once every writing rank has reported its checksums in the folder, publishes it after a failure
when the ranks finish in time, and otherwise leaves it unpublished with the previous one intact.

The trainer runs on fake worker groups (no Ray); the real ranks' side is
tests/workers/test_async_save_on_cpu.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from opcd import trainer as trainer_module
from opcd.errors import OpcdError, WorkerError
from opcd.runs.checkpoint import (WRITTEN, complete_steps, file_sha256, latest_checkpoint, read_checksums,
                                  read_trainer_state, report_written, verify_checkpoint)
from tests.test_faults_on_cpu import _FakeStudent, _Recorder, _trainer

RANKS = 2


class _WritingInBackground(_FakeStudent):
    """Two ranks that each write a shard and answer None to start_save (still writing); they report in the
    folder when the test says so (`report`), or at once with `report_at_once`."""

    def __init__(self, skipped, report_at_once: bool = False, fail_update: int | None = None):
        super().__init__(skipped)
        self.report_at_once, self.fail_update = report_at_once, fail_update
        self.folders: list[Path] = []

    def call(self, method, *args):
        if method.__name__ == "start_save":
            folder = Path(args[0])
            for rank in range(RANKS):
                (folder / f"shard-{rank}").write_text(f"rank {rank} at {folder.name}")
            self.folders.append(folder)
            if self.report_at_once:
                self.report(folder)
            return [None] * RANKS
        if method.__name__ == "finish_save":
            return [None] * RANKS
        return super().call(method, *args)

    def gather(self, method, *args):
        if method.__name__ == "update" and self.updates + 1 == self.fail_update:
            raise WorkerError("student worker rank 1 failed in update: RuntimeError: injected")
        return super().gather(method, *args)

    @staticmethod
    def report(folder: Path, ranks=range(RANKS), error: BaseException | None = None) -> None:
        for rank in ranks:
            shard = folder / f"shard-{rank}"
            report_written(folder, rank, None if error else {shard.name: file_sha256(shard)}, error)


def _background_trainer(tmp_path: Path, steps: int, save_freq: int, **student) -> trainer_module.Trainer:
    trainer = _trainer(tmp_path, skipped=[0] * steps, limit=3, save_freq=save_freq)
    trainer.student = _WritingInBackground([0] * steps, **student)
    return trainer


def test_a_checkpoint_is_published_only_once_every_writing_rank_has_reported(tmp_path):
    trainer = _background_trainer(tmp_path, steps=2, save_freq=1)
    assert trainer.save(1) is None and complete_steps(tmp_path) == []
    folder = trainer.student.folders[0]
    _WritingInBackground.report(folder, ranks=[0])
    assert not trainer._written(trainer.pending, wait_s=0)  # rank 1 is still writing
    _WritingInBackground.report(folder, ranks=[1])
    assert trainer._written(trainer.pending, wait_s=0)
    published = trainer.finish_save()
    assert published == tmp_path / "global_step_1" and latest_checkpoint(tmp_path)[0] == 1
    assert verify_checkpoint(published) is None
    assert {"shard-0", "shard-1", "trainer_state.json"} == set(read_checksums(published))
    assert not (published / WRITTEN).exists()  # the reports are not part of the checkpoint


def test_a_run_publishes_a_written_checkpoint_after_the_next_step_and_the_last_at_its_end(tmp_path):
    trainer = _background_trainer(tmp_path, steps=3, save_freq=2, report_at_once=True)
    assert trainer.fit(_Recorder(), start_step=0) == 3
    assert complete_steps(tmp_path) == [2, 3] and trainer.pending is None
    # taken at its step, not when it was published: the data position moved on in between
    assert read_trainer_state(tmp_path / "global_step_2")["step"] == 2


def test_a_failing_run_publishes_the_checkpoint_its_ranks_finished_writing(tmp_path):
    """Regression guard for the failure path: a rank fails in the update of step 3 while step 2's
    checkpoint is pending; its ranks have written it, so it is published before the error goes up."""
    trainer = _background_trainer(tmp_path, steps=4, save_freq=2, fail_update=3)
    original = trainer.student.call

    def written_late(method, *args):  # the reports arrive after the step that follows the save
        answer = original(method, *args)
        if method.__name__ == "sleep_rollout" and trainer.pending is not None:
            _WritingInBackground.report(trainer.pending.folder)
        return answer
    trainer.student.call = written_late
    with pytest.raises(WorkerError, match="rank 1 failed in update"):
        trainer.fit(_Recorder(), start_step=0)
    assert latest_checkpoint(tmp_path)[0] == 2 and verify_checkpoint(tmp_path / "global_step_2") is None


def test_a_checkpoint_still_being_written_when_the_run_fails_stays_unpublished(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(trainer_module, "PUBLISH_AFTER_FAILURE_S", 0.3)
    trainer = _background_trainer(tmp_path, steps=6, save_freq=2, fail_update=5)
    original = trainer.student.call

    def only_step_2_reports(method, *args):
        answer = original(method, *args)
        if method.__name__ == "start_save" and Path(args[0]).name == ".global_step_2.tmp":
            _WritingInBackground.report(Path(args[0]))
        return answer
    trainer.student.call = only_step_2_reports
    with caplog.at_level("WARNING", logger="opcd"), pytest.raises(WorkerError):
        trainer.fit(_Recorder(), start_step=0)
    assert complete_steps(tmp_path) == [2] and verify_checkpoint(tmp_path / "global_step_2") is None
    assert "checkpoint 4 was still being written when the run failed: left unpublished" in caplog.text
    # the next run's first checkpoint removes the unpublished folder
    assert (tmp_path / ".global_step_4.tmp").is_dir()
    _background_trainer(tmp_path, steps=6, save_freq=2, report_at_once=True).save(6)
    assert not (tmp_path / ".global_step_4.tmp").exists()


def test_a_rank_that_could_not_write_is_one_line_and_the_previous_checkpoint_stays(tmp_path):
    trainer = _background_trainer(tmp_path, steps=4, save_freq=2, report_at_once=True)
    trainer.save(2)
    trainer.finish_save()
    trainer.student.report_at_once = False
    trainer.save(4)
    folder = trainer.pending.folder
    _WritingInBackground.report(folder, ranks=[0])
    _WritingInBackground.report(folder, ranks=[1], error=OSError(5, "Input/output error"))
    with pytest.raises(OpcdError, match=r"^student rank 1 could not write checkpoint 4: OSError: \[Errno 5\] "
                                        r"Input/output error$"):
        trainer.finish_save()
    assert complete_steps(tmp_path) == [2] and not folder.exists()


def test_one_rank_or_async_save_off_publishes_at_once(tmp_path):
    trainer = _trainer(tmp_path, skipped=[0, 0], limit=3, save_freq=1)  # ranks answer with their checksums
    assert trainer.save(1) == tmp_path / "global_step_1" and trainer.pending is None
