"""Extraction and consolidation with experience, end to end through Ray with a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opcd.config import load_config
from opcd.errors import ContextError
from opcd.pipelines.distill import run_distill
from opcd.pipelines.extract import run_extract

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


def _extract(runs: Path, model: Path, exp_name: str, ranks: int = 1) -> dict:
    return run_extract(load_config([
        "task=math", f"model.path={model}", f"trainer.runs_dir={runs}", f"trainer.exp_name={exp_name}",
        "extract.stream_items=2", "extract.heldout_size=3", "extract.seeds=[0,1]", "extract.writer_max_tokens=12",
        "rollout.max_response_length=8", "task.experience_max_length=200", f"ray.ranks_per_group={ranks}",
        "trainer.num_threads=1"]))


def test_extraction_writes_every_file_and_is_deterministic(tmp_path, tiny_model):
    summary = _extract(tmp_path, tiny_model, "a")
    run = tmp_path / "a"
    for seed in (0, 1):
        for step in range(3):
            assert (run / f"seed_{seed}" / f"experience_{step}.txt").is_file()
        records = json.loads((run / f"seed_{seed}" / "scores.json").read_text())
        assert [r["step"] for r in records] == [0, 1, 2] and records[0]["items"] == 0
        assert len((run / f"seed_{seed}" / "writer_log.jsonl").read_text().splitlines()) == 2
    assert len((run / "scores.csv").read_text().splitlines()) == 1 + 2 * 3
    best = Path(summary["best"]["path"])
    assert (run / "best_experience.txt").read_text() == best.read_text() != ""
    assert (run / "best_experience.txt").read_text().startswith("[exp] ")
    assert (run / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same seeds give the same files, also with the held-out problems split over 2 ranks
    _extract(tmp_path, tiny_model, "b", ranks=2)
    for seed in (0, 1):
        for name in [f"seed_{seed}/experience_{step}.txt" for step in range(3)] + [f"seed_{seed}/writer_log.jsonl"]:
            assert (run / name).read_text() == (tmp_path / "b" / name).read_text()
    assert (run / "scores.csv").read_text().replace("/a/", "/b/") == (tmp_path / "b" / "scores.csv").read_text()


def test_consolidation_from_an_experience_list(tmp_path, tiny_model):
    (tmp_path / "e1.txt").write_text("[exp] Write the equation before computing.")
    (tmp_path / "e2.txt").write_text("[exp] Check the answer against the question.")
    (tmp_path / "both.list").write_text("e1.txt\ne2.txt\n")
    summary = run_distill(load_config([
        "task=math", f"model.path={tiny_model}", f"task.context_path={tmp_path}/both.list",
        f"trainer.runs_dir={tmp_path}", "trainer.exp_name=c", "trainer.total_training_steps=2",
        "trainer.batch_size=4", "trainer.micro_batch_size=4", "trainer.eval_limit=3", "trainer.loggers=[jsonl]",
        "rollout.max_response_length=8", "loss.kl_topk=8"]))
    assert summary["final_step"] == 2
    rows = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["rollout/teacher_prompt_length"] > r["rollout/prompt_length"] for r in rows)


def test_missing_experience_file_is_an_error(tmp_path, tiny_model):
    cfg = load_config(["task=math", f"model.path={tiny_model}", f"task.context_path={tmp_path}/missing.txt",
                       f"trainer.runs_dir={tmp_path}"])
    with pytest.raises(ContextError, match="context file not found"):
        run_distill(cfg)
