"""Tests for opcd.config: every YAML preset composes and validates, defaults come from the schema,
and each kind of bad input is one ConfigError line naming the key; the CLI reports it with exit 2."""

from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from opcd.cli import main
from omegaconf import OmegaConf

from opcd.config import CONF_DIR, DistillConfig, compose, load_config, schema_defaults, validate
from opcd.errors import ConfigError

GROUPS = ("task", "model", "rollout", "trainer")
# Presets that cannot stand alone: the overrides they need.
REQUIRED = {"model/hf": ["model.path=some/model"]}
DEFAULT_PRESETS = {"task": "language", "model": "smollm2", "rollout": "auto", "trainer": "demo"}
# What an `auto` preset value resolves to on a machine without GPUs (ray.gpus_per_node=0).
CPU_AUTO = {"dtype": "float32", "backend": "hf"}


def _presets() -> list[str]:
    return sorted(f"{group}/{path.stem}" for group in GROUPS for path in (CONF_DIR / group).glob("*.yaml"))


def _preset_yaml(preset: str) -> dict:
    return yaml.safe_load((CONF_DIR / f"{preset}.yaml").read_text()) or {}


def test_every_group_has_presets():
    """Guards the loop below against silently testing nothing (e.g. a renamed conf folder)."""
    found = _presets()
    for group in GROUPS:
        assert any(p.startswith(f"{group}/") for p in found), group
    assert "model/hf" in found and "trainer/paper" in found


@pytest.mark.parametrize("preset", _presets())
def test_every_preset_composes_validates_and_applies_its_values(preset):
    """Each preset's values must reach the typed config (a value lost in composition is a bug too)."""
    group, name = preset.split("/")
    overrides = [f"{group}={name}", *REQUIRED.get(preset, [])]
    cfg = load_config(overrides)
    assert isinstance(cfg, DistillConfig)
    values = _preset_yaml(preset)
    if (CONF_DIR / f"{preset}.yaml").read_text().startswith("# @package _global_"):
        sections = values  # a global preset sets several sections (task/textgame: task, game, rollout)
    else:
        sections = {group: values}
    overridden = {o.split("=")[0] for o in overrides[1:]}
    for section_name, section_values in sections.items():
        section = asdict(getattr(cfg, section_name))
        for key, value in section_values.items():
            if value == "auto":
                value = CPU_AUTO[key]
            elif isinstance(value, str) and value.startswith("${"):  # derived, e.g. the prompt budget
                value = OmegaConf.select(compose(overrides), f"{section_name}.{key}")
            if f"{section_name}.{key}" not in overridden:
                assert section[key] == value, f"{preset}: {section_name}.{key}"


def test_every_trainer_preset_validates_with_every_task():
    for trainer in (CONF_DIR / "trainer").glob("*.yaml"):
        for task in (CONF_DIR / "task").glob("*.yaml"):
            load_config([f"trainer={trainer.stem}", f"task={task.stem}"])


def test_hf_model_preset_requires_a_path():
    """Regression: model/hf.yaml said `path: ???`, but the schema's default path sits under the preset and
    OmegaConf keeps an existing value when `???` is merged onto it, so `model=hf` without model.path
    silently trained the built-in SmolLM2 (in bf16 with flash-attention)."""
    with pytest.raises(ConfigError, match=r"^config model\.path=None: expected a string$"):
        load_config(["model=hf"])
    assert load_config(["model=hf", "model.path=Qwen/Qwen3-8B"]).model.path == "Qwen/Qwen3-8B"


def test_defaults_are_the_schema_plus_the_default_presets():
    """Nothing but config.py's dataclasses and the four default presets decides a default."""
    expected = schema_defaults(DistillConfig)
    for group, name in DEFAULT_PRESETS.items():
        expected[group].update(_preset_yaml(f"{group}/{name}"))
    expected.update({k: {**expected[k], **v} for k, v in
                     yaml.safe_load((CONF_DIR / "distill.yaml").read_text()).items() if k != "defaults"})
    assert asdict(load_config([])) == asdict(validate(expected))


def test_default_values():
    cfg = load_config([])
    assert cfg.model.path == "smollm2-135m-instruct" and cfg.model.teacher_path is None
    assert cfg.model.dtype == "float32" and cfg.model.trust_remote_code is False
    assert (cfg.loss.kl_loss_type, cfg.loss.kl_topk, cfg.loss.support_mode) == ("full", 64, "tail")
    assert cfg.loss.kl_merge_indice is False and cfg.loss.aggregation == "token_mean"
    assert (cfg.rollout.backend, cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.max_response_length) == \
        ("hf", 1, 1.0, 32)
    assert (cfg.trainer.batch_size, cfg.trainer.micro_batch_size, cfg.trainer.lr) == (8, 8, 1e-5)
    assert cfg.trainer.total_training_steps == 30 and cfg.trainer.resume == "auto"
    assert cfg.task.name == "language" and cfg.task.context_kind == "system_prompt"
    assert cfg.ray.address is None and cfg.ray.nnodes == 1
    assert cfg.run_dir == Path.cwd() / "runs" / "french-demo"  # absolute: workers on other nodes start elsewhere


def test_overrides_are_typed():
    cfg = load_config(["trainer.lr=1", "rollout.top_p=0.5", "trainer.loggers=[console]", "model.teacher_path=t"])
    assert cfg.trainer.lr == 1.0 and isinstance(cfg.trainer.lr, float)
    assert cfg.rollout.top_p == 0.5
    assert cfg.trainer.loggers == ["console"]
    assert cfg.model.teacher_path == "t"


@pytest.mark.parametrize("overrides, key", [
    (["trainer.foo=1"], "trainer.foo"),  # Hydra refuses to override a key the schema lacks
    (["+trainer.foo=1"], "trainer.foo"),  # appended keys reach the schema check
    (["+foo=1"], "foo"),
    (["trainer.lr=abc"], "trainer.lr='abc'"),
    (["trainer.batch_size=1.5"], "trainer.batch_size=1.5"),
    (["trainer.eval_before=yes"], "trainer.eval_before='yes'"),
    (["trainer.lr=-1"], "trainer.lr=-1.0"),
    (["rollout.top_p=0"], "rollout.top_p=0.0"),
    (["rollout.top_p=1.5"], "rollout.top_p=1.5"),
    (["rollout.n=0"], "rollout.n=0"),
    (["rollout.temperature=0"], "rollout.temperature=0.0"),
    (["rollout.temperature=1e-30"], "rollout.temperature=1e-30: expected a finite float >= 0.0001"),  # KL exactly 0
    (["rollout.eval_temperature=1e-9"], "rollout.eval_temperature=1e-09: expected 0 (greedy) or a finite float"),
    (["loss.support_mode=foo"], "loss.support_mode='foo'"),
    (["loss.kl_loss_type=seqkd"], "loss.kl_loss_type='seqkd'"),
    (["trainer.loggers=[console,foo]"], "trainer.loggers="),
    (["trainer.exp_name=a/b"], "trainer.exp_name='a/b'"),
    (["loss.kl_merge_indice=true", "loss.kl_topk=0"], "loss.kl_merge_indice=True"),
    (["ray.nnodes=2"], "ray.address=None"),
    (["trainer.micro_batch_size=9"], "trainer.micro_batch_size=9"),
    (["trainer.batch_size=2", "rollout.n=2", "trainer.micro_batch_size=5"], "trainer.micro_batch_size=5"),
    (["trainer.micro_batch_tokens=-1"], "trainer.micro_batch_tokens=-1"),
    (["loss.lm_head_chunk_size=-3"], "loss.lm_head_chunk_size=-3"),
    (["ray.gpus_per_node=1", "ray.placement=separate"], "ray.ranks_per_group=1"),
    (["ray.gpus_per_node=2", "ray.ranks_per_group=3"], "ray.ranks_per_group=3"),
    (["ray.placement=spread"], "ray.placement"),
    (["rollout.hf_cache=paged"], "rollout.hf_cache='paged'"),
    (["rollout.hf_compile=true"], "rollout.hf_compile=True"),  # compiling needs the static cache
    (["rollout.hf_compile=true", "rollout.hf_cache=dynamic"], "rollout.hf_compile=True"),
    (["task=nope"], "unknown task preset 'nope'"),
])
def test_bad_input_is_one_line_config_error_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    message = str(err.value)
    assert message.startswith("config")
    assert key in message
    assert "\n" not in message


def test_cross_field_limits_accept_the_boundary():
    load_config(["trainer.batch_size=2", "rollout.n=2", "trainer.micro_batch_size=4"])
    load_config(["ray.nnodes=2", "ray.address=auto"])
    load_config(["loss.kl_merge_indice=true", "loss.kl_topk=8"])


def test_validate_refuses_unknown_nested_key_from_a_plain_dict():
    with pytest.raises(ConfigError, match=r"^config: unknown key loss\.topk; did you mean loss\.kl_topk\?$"):
        validate({"loss": {"topk": 3}})
    with pytest.raises(ConfigError, match=r"^config trainer=3: expected a mapping$"):
        validate({"trainer": 3})


def test_compose_keeps_the_hydra_override_syntax():
    raw = compose(["task=medmcqa", "trainer.lr=5e-6"])
    cfg = validate(raw)
    assert cfg.task.name == "medmcqa" and cfg.trainer.lr == 5e-6


# -- the CLI ---------------------------------------------------------------------------------------

def test_cli_reports_config_error_on_one_line_with_exit_2(capsys):
    assert main(["distill", "trainer.lr=abc"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "opcd: error: config trainer.lr='abc': expected a number\n"
    assert captured.out == ""


def test_cli_cfg_prints_the_resolved_config_as_yaml(capsys):
    assert main(["distill", "--cfg", "trainer.lr=2e-5", "task=safety"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == asdict(load_config(["trainer.lr=2e-5", "task=safety"]))
    assert printed["trainer"]["lr"] == 2e-5 and printed["task"]["name"] == "safety"


def test_cli_cfg_of_the_defaults(capsys):
    assert main(["distill", "--cfg"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == asdict(load_config([]))


@pytest.mark.parametrize("overrides, expected", [
    (["rollout.vllm_tensor_parallel_size=0"], "an integer >= 1"),
    (["rollout.vllm_tensor_parallel_size=2"], "1 unless rollout.backend=vllm"),
    (["rollout.backend=vllm", "rollout.vllm_tensor_parallel_size=2"], "1 on CPU"),
    (["rollout.backend=vllm", "ray.gpus_per_node=8", "ray.ranks_per_group=6", "rollout.vllm_tensor_parallel_size=4"],
     "a divisor of ray.ranks_per_group=6"),
    (["rollout.backend=vllm", "ray.nnodes=2", "ray.address=auto", "ray.gpus_per_node=2", "ray.ranks_per_group=4",
      "rollout.vllm_tensor_parallel_size=4"], "at most ray.gpus_per_node=2"),
])
def test_vllm_tensor_parallel_size_is_checked_against_the_ranks(overrides, expected):
    with pytest.raises(ConfigError, match=r"^config rollout\.vllm_tensor_parallel_size=\d+: expected ") as err:
        load_config(overrides)
    assert expected in str(err.value)


def test_vllm_tensor_parallel_engines_split_the_ranks():
    from opcd.pipelines.distill import engine_ranks

    cfg = load_config(["rollout.backend=vllm", "ray.gpus_per_node=8", "ray.ranks_per_group=8",
                       "rollout.vllm_tensor_parallel_size=2"])
    assert engine_ranks(cfg.rollout) == 2
    assert engine_ranks(load_config(["ray.gpus_per_node=8", "ray.ranks_per_group=8"]).rollout) == 1
