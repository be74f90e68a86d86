"""The run folder (opcd/runs/folder.py): one run at a time, a resume that never mixes two runs, a
finished run left alone, a full disk named in one line. Driver-level: Ray never starts here; the
run folders are laid out by hand as a run leaves them (config.yaml, a complete checkpoint)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opcd.runs.checkpoint import latest_checkpoint, save_checkpoint, step_dir
from opcd.cli import main
from opcd.config import load_config, to_yaml
from opcd.errors import ConfigError, OpcdError
from opcd.runs.folder import LOCK, _start_time, acquire_lock, claimed, release_lock


def _overrides(tmp_path, tiny_model, *extra) -> list[str]:
    return [f"model.path={tiny_model}", f"trainer.runs_dir={tmp_path}/runs", "trainer.exp_name=run",
            "trainer.loggers=[jsonl]", "trainer.total_training_steps=4", "trainer.lr=3e-3", *extra]


def _saved_run(tmp_path, tiny_model, step: int, *extra, summary: bool = False) -> Path:
    """A run folder as `opcd distill` leaves it after saving `step` (weights are not needed here)."""
    cfg = load_config(_overrides(tmp_path, tiny_model, *extra))
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True)
    save_checkpoint(run_dir, step, lambda folder: (folder / "weights.txt").write_text(str(step)) and None,
                    {"step": step})
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, step + 1)))
    if summary:
        (run_dir / "summary.json").write_text(json.dumps({"run_dir": str(run_dir), "final_step": step,
                                                          "eval": {"student_after": {"score": 0.5}},
                                                          "checkpoint": str(run_dir / f"global_step_{step}")}))
    return run_dir


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["distill", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


# -- the lock --------------------------------------------------------------------------------------

@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def _lock(run_dir: Path, pid: int, started) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": started}))
    return run_dir / LOCK


def test_a_second_run_on_a_busy_folder_refuses_naming_the_folder_and_the_holder(tmp_path, tiny_model, capsys,
                                                                                live_process):
    """Guards against two runs writing one folder at once (their checkpoints and metrics interleaved)."""
    run_dir = tmp_path / "runs" / "run"
    _lock(run_dir, live_process.pid, _start_time(live_process.pid))
    code, _, err = _cli(capsys, *_overrides(tmp_path, tiny_model))
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"opcd: error: {run_dir} is in use by another run (pid {live_process.pid} on "
                          f"{socket.gethostname()}, since ")
    assert json.loads((run_dir / LOCK).read_text())["pid"] == live_process.pid  # the holder keeps its lock


def test_a_stale_lock_is_taken_over_and_released(tmp_path, live_process):
    """A lock left by a killed run (dead pid), or naming a pid that now belongs to another process
    (start time differs), must not block the folder forever."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for pid, started in ((int(dead.stdout), None), (live_process.pid, -1)):
        lock = _lock(tmp_path / "run", pid, started)
        assert acquire_lock(tmp_path / "run") == lock
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        release_lock(lock)
        assert not lock.exists()


def test_a_runs_folder_that_cannot_be_created_is_one_line(tmp_path, tiny_model, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = _cli(capsys, *_overrides(tmp_path, tiny_model), f"trainer.runs_dir={tmp_path}/file/runs")
    assert code == 2
    assert err == f"opcd: error: {tmp_path}/file/runs/run: cannot create the run folder: Not a directory"


# -- resume: the same run, or an explicit override -------------------------------------------------

def test_resume_refuses_changed_settings_naming_each_key_old_and_new(tmp_path, tiny_model, capsys):
    """Guards the mixed resume: a run saved with lr 3e-3 resumed with lr 1e-4 and seed 7 used to
    continue silently (the optimiser's lr won, config.yaml was rewritten)."""
    run_dir = _saved_run(tmp_path, tiny_model, 2)
    saved = (run_dir / "config.yaml").read_text()
    code, _, err = _cli(capsys, *_overrides(tmp_path, tiny_model, "trainer.lr=1e-4", "trainer.seed=7"))
    assert code == 2
    assert err == (f"opcd: error: {run_dir} holds a run saved at step 2 with other settings (trainer.lr was 0.003, "
                   f"now 0.0001; trainer.seed was 0, now 7): to change them in this run pass "
                   f"trainer.resume_override=[trainer.lr,trainer.seed], to start afresh trainer.resume=never (the "
                   f"old run is moved aside), or pick another trainer.exp_name")
    assert (run_dir / "config.yaml").read_text() == saved  # nothing rewritten
    assert not (run_dir / LOCK).exists()


def test_resume_accepts_named_overrides_and_settings_that_do_not_change_the_run(tmp_path, tiny_model, caplog):
    _saved_run(tmp_path, tiny_model, 2)
    free = ["trainer.total_training_steps=10", "trainer.loggers=[console]", "trainer.eval_freq=2",
            "trainer.save_freq=1", "trainer.num_threads=1", "ray.num_cpus=4", "game.max_steps=9"]
    with claimed(load_config(_overrides(tmp_path, tiny_model, *free))) as finished:
        assert finished is None
    cfg = load_config(_overrides(tmp_path, tiny_model, "trainer.lr=1e-4", "trainer.resume_override=[trainer.lr]"))
    with claimed(cfg) as finished:
        assert finished is None
    assert "trainer.lr changed from 0.003 to 0.0001 (trainer.resume_override)" in caplog.text
    with pytest.raises(ConfigError, match=r"trainer\.seed was 0, now 7"):  # an override covers only its keys
        with claimed(load_config(_overrides(tmp_path, tiny_model, "trainer.lr=1e-4", "trainer.seed=7",
                                            "trainer.resume_override=[trainer.lr]"))):
            pass


def test_resume_override_names_known_keys():
    with pytest.raises(ConfigError, match=r"^config trainer.resume_override=\['trainer.lrr'\]: expected dotted "
                                          r"config keys such as trainer.lr \('trainer.lrr' is not one\)$"):
        load_config(["trainer.resume_override=[trainer.lrr]"])


def test_resume_never_moves_the_old_run_aside_so_a_rerun_continues_the_new_one(tmp_path, tiny_model):
    """Guards resume=never in an old folder: the old checkpoints stayed, so a crash of the new run and
    a plain rerun continued the OLD run (metrics: new step 1, then old steps 5-6)."""
    run_dir = _saved_run(tmp_path, tiny_model, 6)
    with claimed(load_config(_overrides(tmp_path, tiny_model, "trainer.resume=never", "trainer.lr=1e-4"))):
        assert sorted(p.name for p in run_dir.iterdir()) == ["inputs.json", LOCK]
    (aside,) = run_dir.parent.glob("run.old-*")
    assert sorted(p.name for p in aside.iterdir()) == ["config.yaml", "global_step_6", "latest_checkpointed_iteration.txt",
                                                       "metrics.jsonl"]
    assert latest_checkpoint(run_dir) is None and latest_checkpoint(aside)[0] == 6  # nothing lost, nothing mixed


def test_a_finished_run_says_it_is_complete_without_starting_anything(tmp_path, tiny_model, capsys, caplog):
    """Guards re-running a finished run: it used to start Ray, load both models and evaluate again."""
    run_dir = _saved_run(tmp_path, tiny_model, 4, summary=True)
    (run_dir / "report").mkdir()
    (run_dir / "report" / "report.html").write_text("<p>report</p>")
    with caplog.at_level("INFO", logger="opcd"):
        code, out, _ = _cli(capsys, *_overrides(tmp_path, tiny_model))
    assert code == 0 and json.loads(out[:out.rindex("}") + 1]) == {"student_after": {"score": 0.5}}
    assert f"{run_dir} is complete (step 4 of 4); its report: {run_dir}/report/report.html" in caplog.text
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert not (run_dir / LOCK).exists()


def test_a_finished_run_whose_last_checkpoint_is_damaged_is_not_complete(tmp_path, tiny_model, caplog):
    """Bug: a finished run whose last checkpoint had flipped bytes still said "complete" (its result is
    that checkpoint); now it is named and the run resumes from the newest intact checkpoint."""
    from opcd.runs.folder import check_resume

    run_dir = _saved_run(tmp_path, tiny_model, 4, summary=True)
    cfg = load_config(_overrides(tmp_path, tiny_model))
    assert check_resume(cfg, run_dir)["complete"] is True
    (step_dir(run_dir, 4) / "weights.txt").write_text("5")
    with caplog.at_level("WARNING", logger="opcd"):
        assert check_resume(cfg, run_dir) is None
    assert (f"{run_dir}: the last checkpoint is damaged (weights.txt does not match its checksum (flipped or "
            f"truncated bytes)), so the run is not complete") in caplog.text


@pytest.mark.parametrize("content", [b'{"final_step": 4, "ev', b"", b"[4]", b'{"final_step": "\xff"}'])
def test_a_damaged_summary_is_one_warning_and_the_run_is_finished_again(tmp_path, tiny_model, caplog, content):
    from opcd.runs.folder import check_resume

    run_dir = _saved_run(tmp_path, tiny_model, 4, summary=True)
    (run_dir / "summary.json").write_bytes(content)
    with caplog.at_level("WARNING", logger="opcd"):
        assert check_resume(load_config(_overrides(tmp_path, tiny_model)), run_dir) is None
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"{run_dir / 'summary.json'}: ") and warning.endswith("finishing the run again rewrites it")


def test_a_damaged_inputs_json_is_one_line(tmp_path, tiny_model, capsys):
    run_dir = _saved_run(tmp_path, tiny_model, 2)
    (run_dir / "inputs.json").write_bytes(b'{"model.path": {"conf')
    code, _, err = _cli(capsys, *_overrides(tmp_path, tiny_model))
    assert code == 2 and err.startswith(f"opcd: error: {run_dir / 'inputs.json'}: not valid JSON (") and "\n" not in err


def test_a_model_copied_over_in_place_is_refused_on_resume(tmp_path, tiny_model, capsys):
    """Bug: a resume did not notice that the files behind model.path changed in place (a copied-over
    model.safetensors resumed silently; KL 6.4e-7 -> 7.8e-5)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    run_dir = _saved_run(tmp_path, model, 2)
    cfg = load_config(_overrides(tmp_path, model))
    with claimed(cfg):
        pass
    assert json.loads((run_dir / "inputs.json").read_text())["model.path"]["config.json"][0] > 0
    (model / "config.json").write_text((model / "config.json").read_text().replace("{", '{"note": 1, ', 1))
    code, _, err = _cli(capsys, *_overrides(tmp_path, model))
    assert code == 2 and err == (
        f"opcd: error: {run_dir} holds a run saved at step 2 whose input files have changed since (model.path "
        f"({model}): config.json has other content): to go on with the new files pass "
        f"trainer.resume_override=[model.path], to start afresh trainer.resume=never")
    with claimed(load_config(_overrides(tmp_path, model, "trainer.resume_override=[model.path]"))):
        pass  # accepted on purpose, and recorded: the next resume compares with the new files
    with claimed(cfg):
        pass


def test_keep_last_n_and_hf_export_may_change_on_resume(tmp_path, tiny_model):
    _saved_run(tmp_path, tiny_model, 2)
    with claimed(load_config(_overrides(tmp_path, tiny_model, "trainer.keep_last_n=1", "trainer.hf_export=none"))):
        pass


# -- a full disk while a checkpoint is written -----------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root and mount rights; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)  # lazy: a failed test may still hold a file open


def test_a_full_disk_inside_torch_save_is_the_no_space_line_and_keeps_the_last_checkpoint(small_disk):
    """Guards the checkpoint write on a full disk: torch.save fails with "enforce fail at
    inline_container.cc" (no errno), which reached the user as a traceback."""
    from tests.test_faults_on_cpu import _FakeStudent, _trainer

    class Saving(_FakeStudent):
        def call(self, method, *args):
            if method.__name__ == "start_save":
                torch.save({"w": torch.zeros(300_000)}, Path(args[0]) / "optimizer.pt")  # 1.2 MB: one fits
            return super().call(method, *args)

    trainer = _trainer(small_disk, skipped=[0, 0], limit=5)
    trainer.student = Saving(trainer.student.skipped)
    trainer.save(1)
    with pytest.raises(OpcdError, match=rf"^no space left on device while writing checkpoint "
                                        rf"{small_disk}/global_step_2 \(the previous checkpoint, step 1, is intact\)$"):
        trainer.save(2)
    assert latest_checkpoint(small_disk)[0] == 1
    assert not list(small_disk.glob(".global_step_*"))  # the partial copy is gone
