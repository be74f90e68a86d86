"""Trackers: jsonl rows per step, tensorboard events, wandb offline with no network and no key."""

from __future__ import annotations

import json

import pytest

from opcd.runs.tracking import Tracker


def test_every_logger_writes_its_files(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = Tracker(["console", "jsonl", "tensorboard", "wandb"], tmp_path, exp_name="unit",
                      config={"trainer": {"lr": 1e-5}}, total_steps=2)
    tracker.log({"loss/kl": 0.5, "rollout/score": 0.25}, step=1)
    tracker.log({"loss/kl": float("nan"), "rollout/score": 0.5}, step=2)
    tracker.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 1, "loss/kl": 0.5, "rollout/score": 0.25}
    assert rows[1]["step"] == 2 and rows[1]["loss/kl"] == "nan"  # JSON has no NaN: kept as a string
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert (tmp_path / "wandb_run_id.txt").is_file()


def test_wandb_run_id_is_stable_across_resumes(tmp_path):
    """A resumed run must continue the same wandb run, not start a new one."""
    from opcd.runs.tracking import _wandb_id

    assert _wandb_id(tmp_path, "exp") == _wandb_id(tmp_path, "exp")


SECRET = "k" * 40


def test_no_secret_in_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracker = Tracker(["jsonl", "wandb"], tmp_path, exp_name="unit", config={"a": 1}, total_steps=1)
    tracker.log({"loss/kl": 1.0}, step=1)
    tracker.close()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_progress_bar_covers_training_steps_only_and_ends_once(tmp_path, capsys):
    """Regression: the bar started before the evaluation before training (so its rate and ETA counted
    it), the evaluation after training printed nothing under a frozen bar, and the last bar line was
    printed twice."""
    tracker = Tracker(["console"], tmp_path, exp_name="unit", config={}, total_steps=2)
    tracker.message("evaluating before training")
    out, err = capsys.readouterr()
    assert out == "evaluating before training\n" and err == ""  # no bar yet: its clock has not started
    tracker.start_progress()
    tracker.log({"loss/kl": 0.5}, step=1)
    tracker.log({"loss/kl": 0.25}, step=2)
    tracker.end_progress()
    tracker.message("evaluating the trained student")
    tracker.close()
    out, err = capsys.readouterr()
    assert out == "evaluating the trained student\n"
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert sum("2/2" in line for line in lines) == 1, lines
    assert lines[-1].startswith("unit: 100%") and "kl=0.25" in lines[-1] and err.endswith("\n")
    assert "\x1b" not in err


def test_a_resumed_bar_starts_at_its_step(tmp_path, capsys):
    tracker = Tracker(["console"], tmp_path, exp_name="unit", config={}, total_steps=4, start_step=2)
    tracker.log({"loss/kl": 0.5}, step=3)  # a caller that never called start_progress still gets the bar
    tracker.close()
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    assert "2/4" in lines[0] and "3/4" in lines[-1]


def test_a_wandb_run_id_keeps_only_characters_wandb_accepts(tmp_path):
    """Bug: trainer.exp_name='run:1' with wandb failed after the models had loaded (run ids refuse ':')."""
    import re

    from opcd.runs.tracking import _wandb_id

    run_id = _wandb_id(tmp_path, "run:1/a b#c?")
    assert re.fullmatch(r"run-1-a-b-c--[0-9a-f]{8}", run_id), run_id
    assert _wandb_id(tmp_path, "run:1/a b#c?") == run_id


@pytest.mark.slow
def test_wandb_with_a_key_and_no_network_falls_back_to_offline_in_one_line(tmp_path, monkeypatch, caplog):
    """Bug: WANDB_API_KEY set with no network: 161 s, then 67 lines of CommError. Now the online start is
    bounded by WANDB_INIT_TIMEOUT and the run logs offline, with one warning."""
    import time

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    start = time.monotonic()
    tracker = Tracker(["wandb"], tmp_path, exp_name="run:1", config={"a": 1}, total_steps=1)
    tracker.log({"loss/kl": 0.5}, step=1)
    tracker.close()
    assert time.monotonic() - start < 60
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "opcd"]
    assert len(warnings) == 1 and warnings[0].startswith("wandb: cannot reach http://127.0.0.1:9 within 3 s (")
    assert list((tmp_path / "wandb").glob("offline-run-*"))
