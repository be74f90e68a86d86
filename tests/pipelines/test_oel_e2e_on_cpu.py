"""Online experiential learning end to end through Ray with a tiny model: two rounds on a small
game write every artefact, each round starts from the previous round's policy, and a run
interrupted between phases continues at the first unfinished phase."""

from __future__ import annotations

import json
import os

import pytest

from opcd.config import load_config
from opcd.games.states import read_states
from opcd.pipelines import oel

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


def _cfg(tmp_path, model):
    return load_config([
        "task=textgame", "game.name=FrozenLake-v0", "game.size=2", "game.holes=1", "game.max_steps=2",
        "game.eval_episodes=2", f"model.path={model}", f"trainer.runs_dir={tmp_path}", "trainer.exp_name=oel",
        "trainer.total_training_steps=1", "trainer.batch_size=2", "trainer.micro_batch_size=2",
        "trainer.loggers=[jsonl]", "trainer.eval_before=false", "rollout.max_response_length=6", "loss.kl_topk=8",
        "extract.stream_items=1", "extract.writer_max_tokens=10", "oel.rounds=2", "oel.deploy_episodes=2",
        "oel.experiences_per_round=2"])


def test_two_rounds_write_everything_and_resume_between_phases(tmp_path, tiny_model, monkeypatch):
    cfg = _cfg(tmp_path, tiny_model)
    real = oel.OnlineExperientialLearning._consolidate

    def fail_in_round_two(self, folder, policy, r):
        if r == 2:
            raise KeyboardInterrupt  # the user stops the run after round 2's deploy phase
        return real(self, folder, policy, r)

    monkeypatch.setattr(oel.OnlineExperientialLearning, "_consolidate", fail_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        oel.run_oel(cfg)
    run = tmp_path / "oel"
    assert (run / "round_1" / "consolidate.done").is_file() and (run / "round_2" / "deploy.done").is_file()
    assert not (run / "round_2" / "consolidate.done").exists()
    stamps = {p: os.stat(p).st_mtime_ns for p in run.rglob("*") if p.is_file() and "round_2" not in str(p)
              and p.name != "oel_summary.json"}
    monkeypatch.undo()

    summary = oel.run_oel(cfg)
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for p, stamp in stamps.items():
        assert os.stat(p).st_mtime_ns == stamp, f"{p} was redone"
    round1, round2 = summary["rounds"]
    assert round1["policy"] == str(tiny_model)
    assert round2["policy"] == round1["policy_after"] and round1["policy_after"].endswith("global_step_1/model")
    assert summary["final_policy"] == round2["policy_after"] != round1["policy_after"]
    for r in (1, 2):
        folder = run / f"round_{r}"
        listed = (folder / "experiences.list").read_text().split()
        assert 1 <= len(listed) <= 2 and all(open(p).read().startswith("[exp] ") for p in listed)
        states = read_states(folder / "deploy" / "states.jsonl")
        assert len(states) >= 2 and {s["turn"] for s in states} <= {0, 1}
        assert (folder / "consolidate" / "global_step_1" / "model").is_dir()
        config = (folder / "consolidate" / "config.yaml").read_text()
        assert "states_path:" in config and "experiences.list" in config
    assert json.loads((run / "oel_summary.json").read_text())["rounds"][1]["round"] == 2


def test_oel_refuses_non_game_tasks(tmp_path, tiny_model):
    from opcd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"opcd oel runs text games \(expected task=textgame\)"):
        oel.run_oel(load_config([f"model.path={tiny_model}", f"trainer.runs_dir={tmp_path}"]))
