"""Worker specs (opcd/workers/spec.py) hold the config's own sections: a setting reaches a worker by
one field in the schema, its checks are the schema's, and the few per-worker values are checked by name."""

import dataclasses
import typing

import pytest
import torch

from opcd.config import load_config
from opcd.config.resolve import Machine
from opcd.errors import ConfigError
from opcd.pipelines.domain_setup import load_run_context, make_domain
from opcd.pipelines.worker_setup import frozen_context, frozen_spec, student_context
from opcd.rollout.engines import vllm_settings
from opcd.workers.spec import WorkerSpec

CPU = torch.device("cpu")


@pytest.mark.parametrize("key,value,message", [
    ("dtype", "float8", r"^config model\.dtype='float8': expected"),
    ("temperature", 0.0, r"^config rollout\.temperature=0\.0: expected"),
    ("micro_batch_size", 0, r"^config trainer\.micro_batch_size=0: expected"),
    ("teacher_micro_batch_tokens", -1, r"^config trainer\.teacher_micro_batch_tokens=-1: expected"),
    ("lm_head_chunk_size", -1, r"^config loss\.lm_head_chunk_size=-1: expected"),
    ("lr", 0.0, r"^config trainer\.lr=0\.0: expected"),
    ("aggregation", "sum", r"^config loss\.aggregation='sum': expected"),
    ("backend", "sglang", r"^config rollout\.backend='sglang': expected"),
    ("vocab_rows", 0, r"^WorkerSpec\.vocab_rows=0: expected"),
    ("objective", "kl", r"^WorkerSpec\.objective='kl': expected"),
    ("micro_batch", 2, r"^WorkerSpec setting='micro_batch': expected a key of one of the config sections"),
])
def test_bad_values_are_refused_by_the_schema_or_by_name(key, value, message):
    with pytest.raises(ConfigError, match=message):
        WorkerSpec.build("m", **{key: value})


def test_unresolved_machine_values_are_refused():
    cfg = load_config([])  # resolved for this machine: no `auto` left
    assert WorkerSpec.from_config(cfg, "m").dtype == "float32"
    with pytest.raises(ConfigError, match=r"^WorkerSpec\.model\.dtype='auto': expected a resolved dtype"):
        WorkerSpec("m", dataclasses.replace(cfg.model, dtype="auto"), cfg.rollout, cfg.trainer, cfg.loss)


def test_a_spec_holds_the_configs_own_sections(smollm2_tokenizer):
    """No field is re-declared: what the config says is what the worker reads (a new setting is one edit)."""
    cfg = load_config(["model.dtype=bfloat16", "rollout.temperature=0.7", "trainer.micro_batch_tokens=300",
                       "loss.lm_head_chunk_size=0", "trainer.lr=3e-4", "loss.aggregation=seq_mean",
                       "model.cpu_offload=true", "model.activation_checkpointing=true", "rollout.hf_cache=static"])
    spec = WorkerSpec.from_config(cfg, "/models/x", vocab_rows=100)
    assert (spec.model, spec.rollout, spec.trainer, spec.loss) == (cfg.model, cfg.rollout, cfg.trainer, cfg.loss)
    assert (spec.model_path, spec.dtype, spec.vocab_rows, spec.kl_loss_type) == ("/models/x", "bfloat16", 100, "full")
    assert WorkerSpec.from_config(cfg, "m", objective="forward_kl").kl_loss_type == "forward_kl"
    own = {f.name for f in dataclasses.fields(WorkerSpec)} - {"model", "rollout", "trainer", "loss"}
    assert own == {"model_path", "vocab_rows", "max_model_len", "objective"}


def test_build_places_each_key_in_its_section_and_replace_keeps_the_rest():
    spec = WorkerSpec.build("m", micro_batch_size=3, lr=1e-3, backend="vllm", kl_topk=8, vocab_rows=7)
    assert (spec.trainer.micro_batch_size, spec.trainer.lr, spec.rollout.backend, spec.loss.kl_topk,
            spec.vocab_rows) == (3, 1e-3, "vllm", 8, 7)
    changed = spec.replace(micro_batch_size=5, max_model_len=64)
    assert (changed.trainer.micro_batch_size, changed.trainer.lr, changed.max_model_len, changed.vocab_rows) == \
        (5, 1e-3, 64, 7)
    assert spec.trainer.micro_batch_size == 3  # the original is untouched


def test_the_teacher_takes_its_own_token_budget():
    spec = WorkerSpec.build("m", micro_batch_size=1, micro_batch_tokens=2048, teacher_micro_batch_tokens=16384)
    assert spec.micro_batching(scoring_only=False) == (1, 2048)
    assert spec.micro_batching(scoring_only=True) == (1, 16384)
    assert WorkerSpec.build("m", micro_batch_tokens=300).micro_batching(scoring_only=True) == (8, 300)


def test_generating_workers_get_the_configured_engine_with_a_context_for_their_prompts(smollm2_tokenizer):
    """The student's vLLM context holds a prompt and its response; a generating frozen model's also the
    experience, a writer's attempt and its lessons (None: unlimited experience, the model's own limit)."""
    cfg = load_config(["rollout.backend=vllm", "task.max_prompt_length=100", "rollout.max_response_length=10",
                       "task.experience_max_length=50", "extract.writer_max_tokens=7", "loss.kl_topk=128",
                       "trainer.seed=5"], machine=Machine(gpus_per_node=0, vllm_installed=True))
    domain = make_domain(cfg, smollm2_tokenizer, load_run_context(cfg.task, smollm2_tokenizer), "train")
    assert student_context(domain, cfg.task, cfg.rollout) == 110
    assert frozen_context(domain, cfg.task, cfg.rollout, cfg.extract) == 110 + 50 + 10 + 7
    spec = frozen_spec(cfg, "/models/x", domain)
    settings = vllm_settings(spec, CPU)
    assert spec.rollout.backend == "vllm" and settings["max_model_len"] == 177
    assert (settings["seed"], settings["max_logprobs"], settings["enforce_eager"]) == (5, 128, True)
    assert vllm_settings(spec, torch.device("cuda", 0))["enforce_eager"] is False  # CUDA graphs on GPUs
    assert frozen_spec(cfg, "/models/x", domain, vocab_rows=5).vocab_rows == 5  # a padded off-policy teacher
    unlimited = load_config(["rollout.backend=vllm", "task.experience_max_length=0"],
                            machine=Machine(gpus_per_node=0, vllm_installed=True))
    assert frozen_context(domain, unlimited.task, unlimited.rollout, unlimited.extract) is None


def test_every_loss_the_config_names_is_a_student_objective():
    """loss.kl_loss_type and offpolicy.objective reach the student as its objective: one set of names (a
    spec that spelled one differently would only fail when an off-policy run starts)."""
    from opcd.config import LossConfig, OffPolicyConfig

    hints = {c: typing.get_type_hints(c) for c in (LossConfig, OffPolicyConfig, WorkerSpec)}
    named = set(typing.get_args(hints[LossConfig]["kl_loss_type"])) | \
        set(typing.get_args(hints[OffPolicyConfig]["objective"]))
    assert named == set(typing.get_args(typing.get_args(hints[WorkerSpec]["objective"])[0]))
    for name in named:
        assert WorkerSpec.build("m", objective=name).kl_loss_type == name
