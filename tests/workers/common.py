"""Shared fixtures and helpers of the in-process worker tests (tests/workers/test_student.py,
tests/workers/test_frozen.py, tests/rollout/test_hf_rollout.py): plain classes, no Ray, tiny random
models that share the real SmolLM2 tokenizer. Loss-level checks use the `sharp_*` variants (peaked
distributions, so a KL is far from rounding noise)."""

import pytest
import torch

from opcd.data.batching import plan_micro_batches, prompt_response_inputs, strip_after_eos
from opcd.models import load_causal_lm, load_tokenizer
from opcd.data.prompts import encode_chat
from opcd.protocol import SamplingParams, UpdateBatch
from opcd.rollout.hf import HFRollout
from opcd.workers.spec import WorkerSpec
from opcd.workers.student import StudentWorker
from opcd.workers.frozen import FrozenModelWorker

QUESTIONS = ["What is the capital of France?", "Hi", "Name three colours of the rainbow, please.", "2+2?"]
SYSTEM = "Always answer in French."
GREEDY = SamplingParams(temperature=0, max_new_tokens=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The workers set torch's global thread count. One thread is fastest for these tiny models (measured:
    a tiny-model generate took 0.1 s on 1 thread, 0.7-2 s on 2 threads of a busy 2-core machine); the
    previous count is restored for the other test modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Student prompts of different lengths (so the batch is left-padded)."""
    return [encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def teacher_prompts(tokenizer):
    return [encode_chat(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
            for q in QUESTIONS]


@pytest.fixture(scope="module")
def tiny_lm(tiny_model):
    return load_causal_lm(str(tiny_model)).eval()


def _student(path, **settings) -> StudentWorker:
    """A student worker; `settings` are config keys without their section (WorkerSpec.build). `worker.step_grads`
    holds the gradients its last optimiser step used (the update frees them right after the step)."""
    worker = StudentWorker(WorkerSpec.build(str(path), num_threads=1, **settings))
    worker.step_grads = {}

    def keep(optimizer, args, kwargs):
        worker.step_grads = {name: p.grad.detach().clone() for name, p in worker.model.named_parameters()
                             if p.grad is not None}
    worker.optimizer.register_step_pre_hook(keep)
    return worker


def _teacher(path, **settings) -> FrozenModelWorker:
    return FrozenModelWorker(WorkerSpec.build(str(path), num_threads=1, **settings))


def _update_batch(student, teacher, prompts, teacher_prompts, *, k=8, max_new_tokens=6, seed=0,
                  lengths=None) -> UpdateBatch:
    """Roll out with the student, optionally cut responses to `lengths`, score with the teacher."""
    gen = student.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens,
                                                   record_topk=k), seed)
    ids, mask = gen.response_ids.clone(), gen.response_mask.clone()
    if lengths is not None:
        for row, length in enumerate(lengths):
            mask[row, length:] = False
        ids = ids.masked_fill(~mask, student.pad_id)
    scores = teacher.score(teacher_prompts, ids, mask, gen.topk_ids, 0)
    return UpdateBatch(prompt_ids=prompts, response_ids=ids, response_mask=mask, support_ids=scores.support_ids,
                       support_mask=scores.support_mask, teacher_logprobs=scores.logprobs,
                       num_tokens=int(mask.sum()), num_sequences=len(prompts))


def _assert_same_weights(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def _max_weight_change(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


def _random_responses(lengths, width, pad_id, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 40000, (len(lengths), width), generator=generator)
    mask = torch.arange(width).expand(len(lengths), width) < torch.tensor(lengths).unsqueeze(-1)
    return ids.masked_fill(~mask, pad_id), mask


def _logprobs_alone(model, prompt, response, temperature):
    """Brute force: the row alone, no padding, full-vocabulary log-softmax, run where the model is (a
    worker's model is on its GPU when there is one). -> [len(response), V] float64 on CPU"""
    with torch.no_grad():
        ids = torch.tensor([prompt + response], device=next(model.parameters()).device)
        logits = model(input_ids=ids).logits[0].double().cpu()
    return torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(response)] / temperature, dim=-1)


