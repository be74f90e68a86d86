"""Worker settings (opcd/workers/spec.py) refuse bad values with one line naming the field, and the
pipelines' one mapping from the config fills every field."""

import dataclasses
import typing

import pytest

from opcd.config import load_config
from opcd.errors import ConfigError
from opcd.pipelines.run_setup import (frozen_context, generation_spec, load_run_context, make_domain, student_context,
                                      train_spec, vllm_kwargs, worker_spec)
from opcd.workers.spec import TrainSpec, WorkerSpec


@pytest.mark.parametrize("spec,field,value", [
    (WorkerSpec, "dtype", "float8"), (WorkerSpec, "temperature", 0.0), (WorkerSpec, "micro_batch_size", 0),
    (WorkerSpec, "lm_head_chunk_size", -1), (TrainSpec, "lr", 0.0), (TrainSpec, "kl_loss_type", "kl"),
    (TrainSpec, "aggregation", "sum"), (WorkerSpec, "rollout_backend", "sglang"), (WorkerSpec, "vocab_rows", 0)])
def test_bad_values_are_refused_by_name(spec, field, value):
    args = {"model_path": "m"} if spec is WorkerSpec else {}
    with pytest.raises(ConfigError, match=rf"^{spec.__name__}\.{field}={value!r}: expected"):
        spec(**args, **{field: value})


def test_the_config_maps_onto_every_field(smollm2_tokenizer):
    cfg = load_config(["model.dtype=bfloat16", "rollout.temperature=0.7", "trainer.micro_batch_tokens=300",
                       "loss.lm_head_chunk_size=0", "trainer.lr=3e-4", "loss.aggregation=seq_mean",
                       "model.cpu_offload=true", "model.activation_checkpointing=true", "rollout.hf_cache=static"])
    spec = worker_spec(cfg, "/models/x", vocab_rows=100)
    assert (spec.model_path, spec.dtype, spec.temperature, spec.micro_batch_tokens, spec.lm_head_chunk_size,
            spec.cpu_offload, spec.vocab_rows, spec.rollout_backend, spec.hf) == \
        ("/models/x", "bfloat16", 0.7, 300, 0, True, 100, "hf", {"cache": "static", "compile": None})
    train = train_spec(cfg)
    assert (train.lr, train.aggregation, train.activation_checkpointing) == (3e-4, "seq_mean", True)
    assert train_spec(cfg, objective="forward_kl").kl_loss_type == "forward_kl"
    # every config-backed field differs from its default somewhere above, or is checked here
    assert {f.name for f in dataclasses.fields(WorkerSpec)} == {
        "model_path", "dtype", "trust_remote_code", "attn_implementation", "cpu_offload", "num_threads",
        "temperature", "micro_batch_size", "micro_batch_tokens", "lm_head_chunk_size", "padding_free",
        "vocab_rows", "rollout_backend", "vllm", "hf"}


def test_generating_workers_get_the_configured_engine_with_a_context_for_their_prompts(smollm2_tokenizer):
    """The student's vLLM context holds a prompt and its response; a generating frozen model's also the
    experience, a writer's attempt and its lessons (None: unlimited experience, the model's own limit)."""
    cfg = load_config(["rollout.backend=vllm", "task.max_prompt_length=100", "rollout.max_response_length=10",
                       "task.experience_max_length=50", "extract.writer_max_tokens=7"])
    domain = make_domain(cfg, smollm2_tokenizer, load_run_context(cfg, smollm2_tokenizer), "train")
    assert student_context(cfg, domain) == 110
    assert frozen_context(cfg, domain) == 110 + 50 + 10 + 7
    spec = generation_spec(cfg, "/models/x", frozen_context(cfg, domain))
    assert spec.rollout_backend == "vllm" and spec.vllm == vllm_kwargs(cfg, 177) and spec.vllm["max_model_len"] == 177
    assert worker_spec(cfg, "/models/x").rollout_backend == "hf"  # no vLLM unless it generates for a living
    assert generation_spec(cfg, "/models/x", 10, vocab_rows=5).vocab_rows == 5  # a padded off-policy teacher
    unlimited = load_config(["rollout.backend=vllm", "task.experience_max_length=0"])
    assert frozen_context(unlimited, domain) is None


def test_every_loss_the_config_names_is_a_student_objective():
    """loss.kl_loss_type and offpolicy.objective reach the student as TrainSpec.kl_loss_type: one set of
    names (a spec that spelled one differently would only fail when an off-policy run starts)."""
    from opcd.config import LossConfig, OffPolicyConfig

    hints = {c: typing.get_type_hints(c) for c in (LossConfig, OffPolicyConfig, TrainSpec)}
    named = set(typing.get_args(hints[LossConfig]["kl_loss_type"])) | \
        set(typing.get_args(hints[OffPolicyConfig]["objective"]))
    assert named == set(typing.get_args(hints[TrainSpec]["kl_loss_type"]))
    for name in named:
        TrainSpec(kl_loss_type=name)
