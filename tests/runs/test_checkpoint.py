"""Tests for opcd.runs.checkpoint (atomic publish, crash safety, checksums, fallback past a damaged
checkpoint, retention) and opcd.data.sampler (resumable batch order)."""

import errno
import json
import os
import stat

import pytest

from opcd.runs.checkpoint import (
    CHECKSUMS,
    COMPLETE,
    LATEST,
    drop_optimizer,
    has_optimizer,
    latest_checkpoint,
    open_like_umask,
    read_checksums,
    read_trainer_state,
    resumable_checkpoint,
    retain,
    save_checkpoint,
    step_dir,
    verify_checkpoint,
)
from opcd.errors import OpcdError
from opcd.data.rows import shuffled_order as epoch_order
from opcd.data.sampler import BatchSampler


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
    assert str(err.value).endswith("(the previous checkpoint, step 1, is intact)")


def test_disk_full_at_the_first_checkpoint_does_not_claim_an_intact_previous_one(tmp_path):
    """Bug: the full-disk line said "the previous checkpoint is intact" when there was none."""
    def disk_full(folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OpcdError) as err:
        save_checkpoint(tmp_path, 1, disk_full, {"step": 1})
    assert str(err.value) == (f"no space left on device while writing checkpoint {step_dir(tmp_path, 1)} (no earlier "
                              f"checkpoint exists, so a rerun starts from the beginning)")


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


# -- checksums and the fallback past a damaged checkpoint -----------------------------------------

def _three_checkpoints(run_dir):
    for step in (2, 4, 6):
        save_checkpoint(run_dir, step, _writer(f"w{step}" * 2000), {"step": step})


def _flip_bytes(path, offset=100, count=64):
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = bytes(b ^ 0xFF for b in data[offset:offset + count])
    path.write_bytes(bytes(data))


def test_checksums_list_every_file_and_are_written_before_the_pointer_moves(tmp_path):
    """The checksums are part of the published folder: `sha256sum -c` format, every file but the
    checksums and the marker, and a checkpoint saved by a writer that hashed some files itself
    (the workers hash their shards) must carry those digests unchanged."""
    import hashlib

    def write(folder):
        _writer("w1")(folder)
        return {"optimizer.pt": hashlib.sha256(b"w1").hexdigest()}

    folder = save_checkpoint(tmp_path, 1, write, {"step": 1})
    sums = read_checksums(folder)
    assert sorted(sums) == ["model/weights.bin", "optimizer.pt", "trainer_state.json"]
    assert sums["model/weights.bin"] == hashlib.sha256(b"w1").hexdigest()
    assert (folder / CHECKSUMS).read_text().splitlines()[0] == f"{sums['model/weights.bin']}  model/weights.bin"
    assert verify_checkpoint(folder) is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "state"])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_is_used(tmp_path, damage):
    """Guards the silent resume from a corrupt checkpoint (issue: 4 KiB of flipped bytes resumed with
    a KL jump of 4.87 and reported success; a truncated file gave a line without its name; a corrupt
    trainer_state.json a traceback): the damaged folder and file are named in one line each and the
    newest intact checkpoint is returned."""
    _three_checkpoints(tmp_path)
    newest = step_dir(tmp_path, 6)
    target = newest / "model" / "weights.bin"
    match damage:
        case "flip":
            _flip_bytes(target)
        case "truncate":
            target.write_bytes(target.read_bytes()[:1000])
        case "delete":
            target.unlink()
        case "state":
            (newest / "trainer_state.json").write_text('{"step": 6, "sampler": {"epo')
    warnings = []
    assert resumable_checkpoint(tmp_path, warnings.append) == (4, step_dir(tmp_path, 4))
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    expected = {"flip": "model/weights.bin does not match its checksum", "truncate": "model/weights.bin does not match",
                "delete": "model/weights.bin is missing", "state": "trainer_state.json does not match"}[damage]
    assert warnings[0].startswith(f"checkpoint {newest} is damaged (") and expected in warnings[0]
    assert warnings[1] == f"resuming from {step_dir(tmp_path, 4)} instead"


def test_an_unreadable_trainer_state_is_one_line(tmp_path):
    save_checkpoint(tmp_path, 1, _writer("w1"), {"step": 1})
    path = step_dir(tmp_path, 1) / "trainer_state.json"
    for text in ("{not json", "[1, 2]", '{"step": "one"}'):
        path.write_text(text)
        with pytest.raises(OpcdError) as err:
            read_trainer_state(step_dir(tmp_path, 1))
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(OpcdError, match="trainer_state.json cannot be read"):
        read_trainer_state(step_dir(tmp_path, 1))


def test_missing_or_garbled_checksums_make_a_checkpoint_damaged(tmp_path):
    _three_checkpoints(tmp_path)
    (step_dir(tmp_path, 6) / CHECKSUMS).unlink()
    (step_dir(tmp_path, 4) / CHECKSUMS).write_text("not a checksum line\n")
    warnings = []
    assert resumable_checkpoint(tmp_path, warnings.append) == (2, step_dir(tmp_path, 2))
    assert "checksums.sha256 is missing" in warnings[0]
    assert "line 1 is not '<sha256>  <relative path>'" in warnings[1]


def test_a_checksum_line_cannot_point_outside_the_folder(tmp_path):
    save_checkpoint(tmp_path, 1, _writer("w1"), {"step": 1})
    (step_dir(tmp_path, 1) / CHECKSUMS).write_text(f"{'0' * 64}  ../../etc/passwd\n")
    assert "is not '<sha256>  <relative path>'" in verify_checkpoint(step_dir(tmp_path, 1))


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    """Starting over in a folder whose every checkpoint is damaged would silently discard the run."""
    _three_checkpoints(tmp_path)
    for step in (2, 4, 6):
        _flip_bytes(step_dir(tmp_path, step) / "optimizer.pt")
    with pytest.raises(OpcdError, match=r"^no intact checkpoint in .*global_step_6: optimizer.pt does not match"):
        resumable_checkpoint(tmp_path, lambda message: None)
    assert resumable_checkpoint(tmp_path / "empty", lambda message: None) is None


# -- retention: keep_last_n, the optimizer state only in the newest checkpoint ----------------------

def test_only_the_newest_checkpoint_keeps_the_optimizer_and_older_ones_stay_intact(tmp_path):
    _three_checkpoints(tmp_path)
    assert retain(tmp_path, 6, keep_last_n=0) == []
    assert [has_optimizer(step_dir(tmp_path, s)) for s in (2, 4, 6)] == [False, False, True]
    assert not (step_dir(tmp_path, 4) / "optimizer.pt").exists()
    assert all(verify_checkpoint(step_dir(tmp_path, s)) is None for s in (2, 4, 6))


def test_keep_last_n_deletes_the_oldest_checkpoints(tmp_path):
    _three_checkpoints(tmp_path)
    removed = retain(tmp_path, 6, keep_last_n=2)
    assert removed == [step_dir(tmp_path, 2)]
    assert latest_checkpoint(tmp_path) == (6, step_dir(tmp_path, 6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step_4", "global_step_6", LATEST]
    assert retain(tmp_path, 6, keep_last_n=1) == [step_dir(tmp_path, 4)]


def test_keep_last_n_is_checked():
    from opcd.config import TrainerConfig

    with pytest.raises(OpcdError, match=r"^config trainer.keep_last_n=-1: expected an integer >= 0"):
        TrainerConfig(keep_last_n=-1)


def test_retention_after_a_fallback_spares_the_resumed_timeline(tmp_path):
    """After a fallback from a damaged step 6 to step 4, the run saves step 5: the optimizer of step 5
    must be kept (the stale step 6 is newer by number, but is not the newest save of this run)."""
    _three_checkpoints(tmp_path)
    save_checkpoint(tmp_path, 5, _writer("w5"), {"step": 5})
    retain(tmp_path, 5, keep_last_n=2)
    assert has_optimizer(step_dir(tmp_path, 5)) and not has_optimizer(step_dir(tmp_path, 4))
    assert not step_dir(tmp_path, 2).exists() and step_dir(tmp_path, 6).exists()


def test_dropping_the_optimizer_unlists_it_before_deleting_it(tmp_path, monkeypatch):
    """A crash between the two steps must leave a valid model-only checkpoint: the checksums never
    list a file that is gone."""
    import shutil

    def sharded_writer(folder):
        _writer("w1")(folder)
        (folder / "optimizer.pt").unlink()
        (folder / "optimizer").mkdir()
        (folder / "optimizer" / "__0_0.distcp").write_text("shard")

    folder = save_checkpoint(tmp_path, 1, sharded_writer, {"step": 1})
    assert has_optimizer(folder)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed between unlisting and deleting
        drop_optimizer(folder)
    assert not has_optimizer(folder) and verify_checkpoint(folder) is None
    monkeypatch.undo()
    drop_optimizer(folder)
    assert not (folder / "optimizer").exists() and verify_checkpoint(folder) is None


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_model_weights_get_the_usual_file_mode(tmp_path, tiny_model):
    """Regression: model.safetensors was written with mode 600 (transformers' save_pretrained) while
    every other file of a checkpoint had 644."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    folder = save_checkpoint(tmp_path, 1, lambda tmp: model.save_pretrained(tmp / "model"), {"step": 1})
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert folder / "model" / "model.safetensors" in files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask(), path
    # wider modes are kept; a folder made by mkdtemp (700) is opened to the umask too
    odd = tmp_path / "odd"
    odd.mkdir(mode=0o700)
    (odd / "run.sh").write_text("#!/bin/sh\n")
    (odd / "run.sh").chmod(0o755)
    open_like_umask(odd)
    assert stat.S_IMODE(odd.stat().st_mode) == 0o777 & ~_umask()
    assert stat.S_IMODE((odd / "run.sh").stat().st_mode) == 0o755 | (0o666 & ~_umask())
