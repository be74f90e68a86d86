"""FSDP2 over 2 CPU ranks (gloo) gives the same teacher scores, loss and updated weights as 1 rank,
and a sharded run checkpoints (each rank its own shard, torch.distributed.checkpoint) and resumes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from opcd.protocol import SamplingParams, UpdateBatch
from opcd.workers.group import WorkerGroup
from opcd.workers.frozen import FrozenModelWorker
from opcd.workers.spec import WorkerSpec
from opcd.workers.student import StudentWorker

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


def _batch(tokenizer, teacher):
    texts = ["Why is the sky blue?", "Name a fruit.", "What is two plus two?", "Say hello.", "Count to three."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for t in texts]
    generation = teacher.gather(FrozenModelWorker.generate, prompts, SamplingParams(temperature=1.0, max_new_tokens=6,
                                                                    record_topk=8), 3)
    return generation, prompts


def test_two_ranks_match_one_rank(sharp_tiny_model, sharp_tiny_deeper_model, smollm2_tokenizer, tmp_path):
    teacher_spec = WorkerSpec.build(str(sharp_tiny_deeper_model), num_threads=1, micro_batch_size=2)
    teachers = {n: WorkerGroup(f"t{n}", FrozenModelWorker, {"spec": teacher_spec}, world_size=n) for n in (1, 2)}
    generation, prompts = _batch(smollm2_tokenizer, teachers[1])
    scores = {n: g.gather(FrozenModelWorker.score, prompts, generation.response_ids, generation.response_mask,
                          generation.topk_ids, 0) for n, g in teachers.items()}
    assert torch.equal(scores[1].support_ids, scores[2].support_ids)
    assert torch.allclose(scores[1].logprobs, scores[2].logprobs, atol=1e-5)
    for group in teachers.values():
        group.shutdown()

    batch = UpdateBatch(prompt_ids=prompts, response_ids=generation.response_ids,
                        response_mask=generation.response_mask, support_ids=scores[1].support_ids,
                        support_mask=None, teacher_logprobs=scores[1].logprobs,
                        num_tokens=int(generation.response_mask.sum()), num_sequences=len(prompts))
    results, weights, sums = {}, {}, {}
    for n in (1, 2):
        student = WorkerGroup(f"s{n}", StudentWorker, {"spec": WorkerSpec.build(str(sharp_tiny_model), num_threads=1,
                                                                                micro_batch_size=2, lr=1e-3)}, world_size=n)
        results[n] = [student.gather(StudentWorker.update, batch) for _ in range(2)]
        weights[n] = student.gather(StudentWorker.state_dict)
        sums[n] = student.call(StudentWorker.save, str(tmp_path / f"ckpt{n}"), True)
        student.shutdown()
    for one, two in zip(results[1], results[2]):
        for key in ("loss", "entropy", "student_mass", "teacher_mass", "grad_norm"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    assert set(weights[1]) == set(weights[2])
    for name, tensor in weights[1].items():
        assert torch.allclose(tensor, weights[2][name], atol=1e-5), name
    # two ranks: a shard file per rank for the model and the optimizer, each hashed by its writer, and
    # the export (asked for) holds the same weights as one rank's checkpoint
    assert [sorted(rank_sums) for rank_sums in sums[2]][1] == ["optimizer/__1_0.distcp", "weights/__1_0.distcp"]
    assert {"weights/__0_0.distcp", "weights/.metadata", "optimizer/__0_0.distcp", "model/model.safetensors",
            "model_config/config.json"} <= set(sums[2][0])
    one, two = (load_file(tmp_path / f"ckpt{n}" / "model" / "model.safetensors") for n in (1, 2))
    assert all(torch.allclose(one[name], two[name], atol=1e-5) for name in one)
    assert (tmp_path / "ckpt1" / "optimizer.pt").is_file() and not (tmp_path / "ckpt1" / "weights").exists()


def test_sharded_distillation_runs_and_resumes(tmp_path, tiny_model, monkeypatch):
    from opcd.runs import checkpoint
    from opcd.runs.checkpoint import has_optimizer, read_checksums
    from opcd.config import load_config
    from opcd.pipelines.distill import run_distill

    def run(steps: int) -> dict:
        return run_distill(load_config([
            f"model.path={tiny_model}", "ray.ranks_per_group=2", "ray.gpus_per_node=0", "trainer.num_threads=1",
            f"trainer.runs_dir={tmp_path}", "trainer.exp_name=fsdp", f"trainer.total_training_steps={steps}",
            "trainer.save_freq=1", "trainer.batch_size=3", "trainer.micro_batch_size=1", "trainer.eval_before=false",
            "trainer.eval_after=false", "trainer.loggers=[jsonl]", "rollout.max_response_length=5",
            "loss.kl_topk=8"]))

    hashed_on_driver = []  # the ranks run in other processes: only the driver's hashing is seen here
    driver_sha256 = checkpoint.file_sha256
    monkeypatch.setattr(checkpoint, "file_sha256", lambda path: hashed_on_driver.append(path) or driver_sha256(path))
    assert run(1)["final_step"] == 1
    first = tmp_path / "fsdp" / "global_step_1"
    # the driver takes the shards' checksums from the ranks that wrote them instead of re-reading every shard
    tmp = first.parent / ".global_step_1.tmp"
    hashed = {p.relative_to(tmp).as_posix() for p in hashed_on_driver if p.is_relative_to(tmp)}
    listed = read_checksums(first)
    assert {"weights/__0_0.distcp", "weights/__1_0.distcp"} <= set(listed) and hashed
    assert not any(rel.startswith(("weights/", "optimizer/")) for rel in hashed), hashed
    monkeypatch.undo()
    assert sorted(p.name for p in (first / "weights").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (first / "model").is_dir()  # trainer.hf_export=last
    assert run(2)["final_step"] == 2  # resumed from the sharded checkpoint of step 1
    rows = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss/kl"] >= 0 for r in rows)
    assert not has_optimizer(first) and has_optimizer(tmp_path / "fsdp" / "global_step_2")
