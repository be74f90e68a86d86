"""The workers on a GPU give the CPU's numbers (marker `gpu`: skipped without CUDA). Each pair is built
in process: the GPU worker where CUDA is, its CPU twin with the worker's device choice pinned to the
CPU. fp32 matmuls differ only in summation order (TF32 is off by default); bf16 autocast over fp32
master weights is within bf16 rounding."""

import pytest
import torch

from opcd.models import load_causal_lm
from opcd.rollout.hf import HFRollout
from tests.workers.common import GREEDY, _random_responses, _student, _teacher, _update_batch, one_thread, prompts, teacher_prompts, tiny_lm, tokenizer  # noqa: F401 (fixtures)

pytestmark = pytest.mark.gpu
CPU = torch.device("cpu")


def _pin_to_cpu(monkeypatch):
    monkeypatch.setattr("opcd.workers.base.worker_device", lambda: CPU)


@pytest.mark.parametrize("lm_head_chunk_size", [512, 0])
def test_frozen_scores_on_gpu_equal_cpu(sharp_tiny_deeper_model, teacher_prompts, monkeypatch, lm_head_chunk_size):
    gpu = _teacher(sharp_tiny_deeper_model, temperature=0.8, micro_batch_size=3, lm_head_chunk_size=lm_head_chunk_size)
    assert gpu.device.type == "cuda" and next(gpu.model.parameters()).is_cuda
    _pin_to_cpu(monkeypatch)
    cpu = _teacher(sharp_tiny_deeper_model, temperature=0.8, micro_batch_size=3, lm_head_chunk_size=lm_head_chunk_size)
    assert not next(cpu.model.parameters()).is_cuda
    response_ids, mask = _random_responses([5, 2, 6, 1], 6, cpu.pad_id)
    support = torch.randint(0, 49152, (4, 6, 5), generator=torch.Generator().manual_seed(4))
    a = gpu.score(teacher_prompts, response_ids, mask, support)
    b = cpu.score(teacher_prompts, response_ids, mask, support)
    assert a.logprobs.device == CPU  # results come back on the CPU, whatever the worker computes on
    torch.testing.assert_close(a.logprobs[mask], b.logprobs[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(a.entropy[mask], b.entropy[mask], atol=1e-3, rtol=0)


@pytest.mark.parametrize("dtype,tolerance,grad_tolerance", [("float32", 1e-4, 1e-4), ("bfloat16", 5e-2, 1e-1)])
def test_student_update_on_gpu_equals_cpu(sharp_tiny_model, sharp_tiny_deeper_model, prompts, teacher_prompts,
                                          monkeypatch, dtype, tolerance, grad_tolerance):
    settings = dict(lr=1e-3, grad_clip=1e6, micro_batch_size=3, temperature=0.8)
    gpu = _student(sharp_tiny_model, dtype=dtype, **settings)
    assert gpu.device.type == "cuda"
    assert all(p.is_cuda and p.dtype == torch.float32 for p in gpu.model.parameters())  # fp32 master weights
    _pin_to_cpu(monkeypatch)
    cpu = _student(sharp_tiny_model, **settings)
    batch = _update_batch(cpu, _teacher(sharp_tiny_deeper_model, temperature=0.8), prompts, teacher_prompts,
                          lengths=[5, 1, 3, 6])
    a, b = gpu.update(batch), cpu.update(batch)
    assert b["loss"] > 0.01
    for key in ("loss", "entropy", "student_mass", "teacher_mass", "grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=tolerance, abs=1e-5), key
    for name, grad in cpu.step_grads.items():
        norm = grad.norm().item()
        assert (gpu.step_grads[name].cpu() - grad).norm().item() <= grad_tolerance * norm + 1e-6, name


def test_rollout_follows_the_model_device(tiny_model, tiny_lm, tokenizer, prompts):
    """Regression: the hf engine put its inputs on cuda:0 whenever CUDA was visible, also for a model
    left on the CPU (transformers then warned that input_ids were on another device than the model)."""
    on_cpu = HFRollout(tiny_lm, tokenizer)
    assert on_cpu.device == CPU
    expected = on_cpu.generate(prompts, GREEDY, seed=0)
    on_gpu = HFRollout(load_causal_lm(str(tiny_model)).eval().to("cuda"), tokenizer)
    assert on_gpu.device.type == "cuda"
    got = on_gpu.generate(prompts, GREEDY, seed=0)
    # (tokens are not compared: a random tiny model is near-uniform, so CPU and GPU argmaxes may differ)
    assert got.response_ids.device == CPU and got.response_ids.shape[0] == expected.response_ids.shape[0]
