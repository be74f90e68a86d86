"""Typed configuration: the schema (opcd/config/schema.py), loading it from Hydra YAML
(opcd/config/load.py), the hardware step that decides what was left to the machine (resolve.py),
did-you-mean hints (hints.py) and the bounds a model sets (limits.py).

Defaults live in the schema only; the YAML files in opcd/conf pick presets. Every problem becomes one
`ConfigError` line that names the key, the value and what was expected, before any model loads.
"""

from opcd.config.limits import check_model_limits
from opcd.config.resolve import Machine, resolve
from opcd.config.load import CONF_DIR, compose, load_config, prompt_budget, schema_defaults, to_yaml, validate
from opcd.config.schema import (GAME_TASK, MAX_RAY_CPUS, MAX_RESPONSE_TOKENS, DistillConfig, EvaluateConfig,
                                ExtractConfig, GameConfig, LossConfig, ModelConfig, OELConfig, OffPolicyConfig,
                                RayConfig, RolloutConfig, TaskConfig, TrainerConfig)

__all__ = ["CONF_DIR", "GAME_TASK", "Machine", "MAX_RAY_CPUS", "MAX_RESPONSE_TOKENS", "DistillConfig", "EvaluateConfig",
           "ExtractConfig", "GameConfig", "LossConfig", "ModelConfig", "OELConfig", "OffPolicyConfig", "RayConfig",
           "RolloutConfig", "TaskConfig", "TrainerConfig", "check_model_limits", "compose", "load_config",
           "prompt_budget", "resolve", "schema_defaults", "to_yaml", "validate"]
