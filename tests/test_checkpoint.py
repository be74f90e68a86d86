"""Tests for opcd.checkpoint (atomic publish, crash safety, fallback) and opcd.sampler (resumable
batch order)."""

import errno
import json

import pytest

from opcd.checkpoint import (
    COMPLETE,
    LATEST,
    latest_checkpoint,
    read_trainer_state,
    save_checkpoint,
    step_dir,
)
from opcd.errors import OpcdError
from opcd.rows import shuffled_order as epoch_order
from opcd.sampler import BatchSampler


def _writer(payload: str):
    def write(folder):
        (folder / "model").mkdir()
        (folder / "model" / "weights.bin").write_text(payload)
        (folder / "optimizer.pt").write_text(payload)
    return write


def _hidden_leftovers(run_dir):
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("."))


# -- save_checkpoint -------------------------------------------------------------------------------

def test_save_publishes_folder_and_pointer(tmp_path):
    folder = save_checkpoint(tmp_path, 3, _writer("w3"), {"step": 3, "sampler": {"epoch": 0, "offset": 8}})
    assert folder == step_dir(tmp_path, 3) == tmp_path / "global_step_3"
    assert (folder / "model" / "weights.bin").read_text() == "w3"
    assert (folder / COMPLETE).is_file()
    assert read_trainer_state(folder) == {"step": 3, "sampler": {"epoch": 0, "offset": 8}}
    assert (tmp_path / LATEST).read_text() == "3"
    assert latest_checkpoint(tmp_path) == (3, folder)
    assert _hidden_leftovers(tmp_path) == []


def test_newer_save_moves_the_pointer_and_keeps_the_older_folder(tmp_path):
    save_checkpoint(tmp_path, 1, _writer("w1"), {"step": 1})
    save_checkpoint(tmp_path, 2, _writer("w2"), {"step": 2})
    assert latest_checkpoint(tmp_path) == (2, step_dir(tmp_path, 2))
    assert (step_dir(tmp_path, 1) / "model" / "weights.bin").read_text() == "w1"


def test_resaving_a_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 2, _writer("old"), {"step": 2})
    save_checkpoint(tmp_path, 2, _writer("new"), {"step": 2, "again": True})
    folder = step_dir(tmp_path, 2)
    assert (folder / "model" / "weights.bin").read_text() == "new"
    assert read_trainer_state(folder) == {"step": 2, "again": True}
    assert _hidden_leftovers(tmp_path) == []


def test_crash_inside_write_keeps_previous_checkpoint_and_leaves_no_temp_folder(tmp_path):
    """Regression: only OSError cleaned up the hidden temp folder, so any other failure of the writer
    (an exception raised by the student worker through Ray, Ctrl-C) left a partial copy of the model
    behind in the run folder."""
    save_checkpoint(tmp_path, 1, _writer("w1"), {"step": 1})

    def crash(folder):
        _writer("half")(folder)
        raise RuntimeError("worker died mid-save")

    with pytest.raises(RuntimeError, match="worker died mid-save"):
        save_checkpoint(tmp_path, 2, crash, {"step": 2})
    assert latest_checkpoint(tmp_path) == (1, step_dir(tmp_path, 1))
    assert (tmp_path / LATEST).read_text() == "1"
    assert (step_dir(tmp_path, 1) / "model" / "weights.bin").read_text() == "w1"
    assert not step_dir(tmp_path, 2).exists()
    assert _hidden_leftovers(tmp_path) == []


def test_keyboard_interrupt_inside_write_leaves_no_temp_folder(tmp_path):
    def interrupted(folder):
        _writer("half")(folder)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 5, interrupted, {"step": 5})
    assert latest_checkpoint(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_disk_full_is_a_user_error_and_keeps_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, _writer("w1"), {"step": 1})

    def disk_full(folder):
        (folder / "optimizer.pt").write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OpcdError, match="no space left on device while writing checkpoint .*global_step_2") as err:
        save_checkpoint(tmp_path, 2, disk_full, {"step": 2})
    assert "\n" not in str(err.value)
    assert latest_checkpoint(tmp_path) == (1, step_dir(tmp_path, 1))
    assert _hidden_leftovers(tmp_path) == []


def test_other_os_errors_propagate_unchanged(tmp_path):
    def denied(folder):
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(PermissionError):
        save_checkpoint(tmp_path, 1, denied, {"step": 1})
    assert _hidden_leftovers(tmp_path) == []


# -- latest_checkpoint -----------------------------------------------------------------------------

def test_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "global_step_4").mkdir()  # never completed
    assert latest_checkpoint(tmp_path) is None


def test_stale_pointer_to_incomplete_folder_falls_back_to_highest_complete_step(tmp_path):
    save_checkpoint(tmp_path, 2, _writer("w2"), {"step": 2})
    save_checkpoint(tmp_path, 10, _writer("w10"), {"step": 10})  # numeric order, not string order
    (tmp_path / "global_step_12" / "model").mkdir(parents=True)  # written without its COMPLETE marker
    (tmp_path / LATEST).write_text("12")
    assert latest_checkpoint(tmp_path) == (10, step_dir(tmp_path, 10))


@pytest.mark.parametrize("pointer", ["", "garbage", "-1", "7"])
def test_unusable_pointer_falls_back(tmp_path, pointer):
    save_checkpoint(tmp_path, 3, _writer("w3"), {"step": 3})
    (tmp_path / LATEST).write_text(pointer)  # "7": a step folder that does not exist
    assert latest_checkpoint(tmp_path) == (3, step_dir(tmp_path, 3))


def test_fallback_ignores_temp_and_foreign_folders(tmp_path):
    save_checkpoint(tmp_path, 1, _writer("w1"), {"step": 1})
    for name in (".global_step_9.tmp", "global_step_9_old", "global_step_x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / COMPLETE).write_text("9")
    (tmp_path / LATEST).unlink()
    assert latest_checkpoint(tmp_path) == (1, step_dir(tmp_path, 1))


# -- BatchSampler ----------------------------------------------------------------------------------

def test_every_example_once_per_epoch():
    sampler = BatchSampler(num_examples=7, batch_size=3, seed=11)
    stream = [i for _ in range(7) for i in sampler.next_batch()]  # 21 indices = 3 whole epochs
    epochs = [stream[0:7], stream[7:14], stream[14:21]]
    for epoch in epochs:
        assert sorted(epoch) == list(range(7))
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # a new permutation per epoch
    assert epochs == [epoch_order(7, 11, e) for e in range(3)]


def test_resumed_sampler_draws_the_same_batches_across_epoch_boundaries():
    reference = BatchSampler(num_examples=5, batch_size=3, seed=4)
    expected = [reference.next_batch() for _ in range(9)]
    for stop in range(9):
        interrupted = BatchSampler(num_examples=5, batch_size=3, seed=4)
        for _ in range(stop):
            interrupted.next_batch()
        state = json.loads(json.dumps(interrupted.state_dict()))  # as stored in trainer_state.json
        resumed = BatchSampler(num_examples=5, batch_size=3, seed=4)
        resumed.load_state_dict(state)
        assert [resumed.next_batch() for _ in range(9 - stop)] == expected[stop:], stop


def test_batch_larger_than_dataset_wraps_into_the_next_epoch():
    sampler = BatchSampler(num_examples=2, batch_size=5, seed=0)
    batch = sampler.next_batch()
    assert len(batch) == 5
    assert batch == epoch_order(2, 0, 0) + epoch_order(2, 0, 1) + epoch_order(2, 0, 2)[:1]
    assert sampler.state_dict() == {"epoch": 2, "offset": 1}


def test_seeds_give_different_orders():
    assert epoch_order(50, 0, 0) != epoch_order(50, 1, 0)
    assert epoch_order(50, 0, 0) == epoch_order(50, 0, 0)


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="at least one example"):
        BatchSampler(num_examples=0, batch_size=2, seed=0)
