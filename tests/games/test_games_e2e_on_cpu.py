"""Text games end to end through Ray with a tiny model: extraction, consolidation (both training
layouts) and checkpoint evaluation, from the same entry points the CLI uses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from opcd.config import load_config
from opcd.data.seeds import heldout_seeds
from opcd.pipelines.distill import run_distill
from opcd.pipelines.evaluate import load_run_config, run_evaluate
from opcd.pipelines.extract import run_extract

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]

SMALL = ["game.max_steps=2", "game.eval_episodes=3", "rollout.max_response_length=6", "trainer.loggers=[jsonl]"]


def test_game_extraction_records_pass_rates_and_picks_the_best(tmp_path, tiny_model):
    summary = run_extract(load_config([
        "task=textgame", "game.name=Sokoban-v0", f"model.path={tiny_model}", f"trainer.runs_dir={tmp_path}",
        "trainer.exp_name=x", "extract.stream_items=2", "extract.seeds=[0]", "extract.writer_max_tokens=10",
        *SMALL]))
    run = tmp_path / "x"
    records = json.loads((run / "seed_0" / "scores.json").read_text())
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        assert 0.0 <= r["score"] <= 1.0 and 1.0 <= r["turns_per_episode"] <= 2.0 and r["tokens_per_turn"] > 0
    log = [json.loads(line) for line in (run / "seed_0" / "writer_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(entry["writer_output"].startswith("[exp] ") for entry in log)
    assert all(1 <= len(entry["moves"]) <= 2 and len(entry["answers"]) == len(entry["moves"]) for entry in log)
    assert log[0]["episode_seed"] != log[1]["episode_seed"]
    assert (run / "best_experience.txt").read_text().startswith("[exp] ")
    assert summary["best"]["step"] in (1, 2)


@pytest.mark.parametrize("mode, game", [("turn", ["game.name=FrozenLake-v0-raw", "game.size=2", "game.holes=1"]),
                                        ("trajectory", ["game.name=Sokoban-v0"])])
def test_game_consolidation_trains_logs_and_evaluates(tmp_path, tiny_model, mode, game):
    overrides = ["task=textgame", f"game.mode={mode}", *game, f"model.path={tiny_model}", f"trainer.runs_dir={tmp_path}",
                 f"trainer.exp_name={mode}", "trainer.total_training_steps=2", "trainer.save_freq=1",
                 "game.episodes_per_step=3", "loss.kl_topk=8", "trainer.lr=1e-3", "trainer.eval_freq=2", *SMALL]
    summary = run_distill(load_config(overrides))
    run = tmp_path / mode
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss/kl"]) and r["loss/kl"] >= 0
        assert 0 <= r["rollout/score"] <= 1 and 1 <= r["rollout/turns_per_episode"] <= 2
        assert r["rollout/teacher_prompt_length"] > r["rollout/prompt_length"]  # the experience block
    assert set(summary["eval"]) == {"student_before", "teacher_with_context", "student_step_2", "student_after"}
    assert "eval/student/score" in rows[1] and "eval/student/score" not in rows[0]  # trainer.eval_freq=2
    assert {p.name for p in (run / "report").iterdir()} >= {"training.png", "report.md", "report.html"}
    episodes = [json.loads(line) for line in (run / "eval_student_after.jsonl").read_text().splitlines()]
    assert len(episodes) == 3 and [e["seed"] for e in episodes] == heldout_seeds(3)

    result = run_evaluate(run, load_run_config(run, ["evaluate.baselines=false"]))
    assert set(result["checkpoints"]) == {1, 2} and result["best"]["k"] == 2
    assert all(0 <= v <= 1 for v in result["checkpoints"].values())
    assert run_evaluate(run, load_run_config(run, ["evaluate.baselines=false"])) == result  # cached
    from opcd.runs.report import write_report

    write_report([run], tmp_path / "report")
    assert "## " + mode + ": checkpoints" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "checkpoints.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_game_name_fails_before_any_worker_starts(tmp_path, tiny_model):
    from opcd.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown text game 'Chess-v9'"):
        run_distill(load_config(["task=textgame", "game.name=Chess-v9", f"model.path={tiny_model}",
                                 f"trainer.runs_dir={tmp_path}"]))
    assert not any(tmp_path.rglob("global_step_*"))
