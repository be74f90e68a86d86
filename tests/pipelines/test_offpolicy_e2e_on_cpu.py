"""The off-policy baseline end to end through Ray with a tiny model: generation (resumable), training
with recomputed or stored teacher log-probs and with seqkd, and the refusal of shards that do not
belong to the run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from opcd.config import load_config
from opcd.errors import DataError
from opcd.pipelines.offpolicy import run_offpolicy_generate, run_offpolicy_train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


def _rows(path: Path, questions: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "content": [{"role": "user", "content": q}], "answer": "fr"})
                            + "\n" for i, q in enumerate(questions)))
    return path


def _cfg(tmp_path: Path, model: Path, data: Path, name: str, *extra: str):
    return load_config([f"model.path={model}", f"task.train_data={data}", f"task.test_data={data}",
                        f"trainer.runs_dir={tmp_path}", f"trainer.exp_name={name}", "trainer.batch_size=2",
                        "trainer.micro_batch_size=2", "trainer.eval_before=false", "trainer.eval_after=false",
                        "trainer.loggers=[jsonl]", "rollout.max_response_length=6", "loss.kl_topk=8",
                        f"offpolicy.save_dir={tmp_path / 'data'}", *extra])


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss/kl"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_generate_resumes_then_train_three_ways(tmp_path, tiny_model):
    data = _rows(tmp_path / "q.jsonl", ["Why is the sky blue?", "How do plants grow?", "What is rain?",
                                        "Why do we sleep?", "What is a star?"])
    first = run_offpolicy_generate(_cfg(tmp_path, tiny_model, data, "gen", "trainer.total_training_steps=1"))
    assert first["generated"] == 1
    shard1 = tmp_path / "data" / "shard_000001.safetensors"
    stamp = os.stat(shard1).st_mtime_ns
    second = run_offpolicy_generate(_cfg(tmp_path, tiny_model, data, "gen", "trainer.total_training_steps=3"))
    assert second["generated"] == 2 and os.stat(shard1).st_mtime_ns == stamp  # resumed: step 1 kept
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert [s["step"] for s in manifest["shards"]] == [1, 2, 3]

    # the same draws as one uninterrupted generation
    fresh = _cfg(tmp_path, tiny_model, data, "gen2", "trainer.total_training_steps=3",
                 f"offpolicy.save_dir={tmp_path / 'data2'}")
    run_offpolicy_generate(fresh)
    from opcd.runs.shards import ShardReader

    a, b = ShardReader(tmp_path / "data"), ShardReader(tmp_path / "data2")
    for step in (1, 2, 3):
        assert a.read(step).keys == b.read(step).keys and a.read(step).teacher_prompts == b.read(step).teacher_prompts

    steps = ["trainer.total_training_steps=3", "trainer.save_freq=0"]
    recompute = run_offpolicy_train(_cfg(tmp_path, tiny_model, data, "recompute", *steps))
    stored = run_offpolicy_train(_cfg(tmp_path, tiny_model, data, "stored", *steps,
                                      "offpolicy.teacher_logprobs=stored"))
    seqkd = run_offpolicy_train(_cfg(tmp_path, tiny_model, data, "seqkd", *steps, "offpolicy.objective=seqkd"))
    assert recompute["final_step"] == stored["final_step"] == seqkd["final_step"] == 3
    r, s, q = (_losses(tmp_path / n) for n in ("recompute", "stored", "seqkd"))
    assert all(math.isfinite(v) and v >= -1e-6 for v in r + s)
    # same weights and data at step 1: recomputed and stored teacher log-probs give the same loss
    assert r[0] == pytest.approx(s[0], rel=1e-4, abs=1e-6)
    assert q[0] > r[0]  # NLL of sampled tokens vs a KL: different objectives
    assert (tmp_path / "recompute" / "global_step_3" / "model").is_dir()


def test_shards_from_another_setting_or_dataset_are_refused(tmp_path, tiny_model):
    data = _rows(tmp_path / "q.jsonl", ["Why is the sky blue?", "How do plants grow?", "What is rain?"])
    run_offpolicy_generate(_cfg(tmp_path, tiny_model, data, "gen", "trainer.total_training_steps=1"))
    other = _rows(tmp_path / "other.jsonl", ["What is snow?", "Why is grass green?", "What is wind?"])
    with pytest.raises(DataError, match=r"shards were generated with train_data=.*q.jsonl.*this run has .*other.jsonl"):
        run_offpolicy_train(_cfg(tmp_path, tiny_model, other, "t"))
    _rows(data, ["Why is the SKY blue?", "How do plants GROW?", "What is RAIN?"])  # same file, new text
    with pytest.raises(DataError, match=r"shard step 1 does not match the dataset \(sequence 0, row:\d: the stored "
                                        r"prompt differs"):
        run_offpolicy_train(_cfg(tmp_path, tiny_model, data, "t", "trainer.total_training_steps=1"))
    manifest = tmp_path / "data" / "manifest.json"
    content = json.loads(manifest.read_text())
    content["header"]["tokenizer"] = "0000000000000000"
    manifest.write_text(json.dumps(content))
    with pytest.raises(DataError, match=r'shards were generated with tokenizer="0000000000000000"'):
        run_offpolicy_train(_cfg(tmp_path, tiny_model, data, "t"))
    with pytest.raises(DataError, match=r"no off-policy shards \(no manifest.json\)"):
        run_offpolicy_train(_cfg(tmp_path, tiny_model, data, "t", f"offpolicy.save_dir={tmp_path / 'none'}"))


def test_text_game_offpolicy_data_and_training(tmp_path, tiny_model):
    game = ["task=textgame", "game.name=Sokoban-v0", "game.max_steps=2", "game.episodes_per_step=2",
            "trainer.total_training_steps=1"]
    data = tmp_path / "unused.jsonl"
    summary = run_offpolicy_generate(_cfg(tmp_path, tiny_model, data, "g", *game))
    assert summary["generated"] == 1
    from opcd.runs.shards import ShardReader

    shard = ShardReader(tmp_path / "data").read(1)
    assert all(k.startswith("game:") and ":turn:" in k for k in shard.keys) and 2 <= len(shard.keys) <= 4
    assert all(len(t) > len(s) for s, t in zip(shard.student_prompts, shard.teacher_prompts))  # experience block
    trained = run_offpolicy_train(_cfg(tmp_path, tiny_model, data, "t", *game))
    assert trained["final_step"] == 1 and math.isfinite(_losses(tmp_path / "t")[0])
