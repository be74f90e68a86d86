"""Loading a config: Hydra YAML (opcd/conf) composed over the schema's defaults, then validated into
the typed sections of opcd/config/schema.py (unknown keys, wrong types and bad values are one line).

Run `opcd distill --cfg` to print the resolved config without running.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, asdict, fields, is_dataclass
from pathlib import Path

from opcd.config.hints import check_overrides, unknown_key_message
from opcd.config.resolve import Machine, resolve
from opcd.config.schema import DistillConfig, _check
from opcd.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def prompt_budget(experience_max_length, fixed, per_turn=0, turns=0) -> int:
    """Tokens a prompt may hold: the context budget, plus `fixed` for the row's own text, plus
    `per_turn` for each game turn of history. The presets derive task.max_prompt_length from it
    (`${prompt_budget:${task.experience_max_length},1024}`), so a larger experience budget grows the
    prompt budget with it instead of getting every teacher prompt dropped."""
    return max(int(experience_max_length), 0) + int(fixed) + int(per_turn) * int(turns)


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("prompt_budget", prompt_budget, replace=True)


def schema_defaults(cls) -> dict:
    """The declared defaults of a config dataclass, nested, before `__post_init__` resolves any `auto`
    value (the composition must keep `auto` until the overrides are in)."""
    values = {}
    for f in fields(cls):
        if is_dataclass(f.default_factory):
            values[f.name] = schema_defaults(f.default_factory)
        elif f.default_factory is not MISSING:
            values[f.name] = f.default_factory()
        else:
            values[f.name] = f.default
    return values


def compose(overrides: list[str], config_name: str = "distill"):
    """Compose opcd/conf/<config_name>.yaml with Hydra overrides; returns an OmegaConf DictConfig."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from hydra.core.config_store import ConfigStore

    _register_resolvers()
    # Every field of the schema, with its default, is the base of the composition: any field can be
    # overridden from the command line, and a key outside the schema is refused by Hydra.
    ConfigStore.instance().store(name="opcd_schema", node=schema_defaults(DistillConfig))
    check_overrides(overrides, DistillConfig, CONF_DIR)  # a misspelt key: "did you mean", not Hydra's "+" advice
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"config: {' '.join(str(exc).split())}") from exc


def validate(raw, machine: Machine | None = None) -> DistillConfig:
    """Build the typed config from a composed one (unknown keys, wrong types and bad values become
    ConfigError) and resolve it for `machine` (default: this one, opcd.config.resolve)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        data = OmegaConf.to_container(raw, resolve=True, throw_on_missing=True) if not isinstance(raw, dict) else raw
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"config {key}: {_first_line(exc)}" if key else f"config: {_first_line(exc)}") from exc
    return resolve(_build(DistillConfig, data, ""), machine or Machine.here())


def build_section(cls, data: dict, name: str):
    """One section of the config (e.g. `TrainerConfig` under `trainer`) from plain values, with the same
    checks as a loaded config's: wrong types and bad values are ConfigError lines naming `name.key`."""
    return _build(cls, data, f"{name}.")


def _build(cls, data, prefix: str):
    """Recursively check `data` against the dataclass `cls` (its type hints are the schema)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config {prefix.rstrip('.') or '<root>'}={data!r}: expected a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"config: {unknown_key_message(prefix + key, [prefix + k for k in known])}")
    values = {}
    for name in known & set(data):
        hint, value, key = hints[name], data[name], f"{prefix}{name}"
        values[name] = _build(hint, value, key + ".") if is_dataclass(hint) else _coerce(hint, value, key)
    return cls(**values)


def _coerce(hint, value, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is typing.Literal:
        _check(value in args, key, value, f"one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        _check(isinstance(value, list), key, value, "a list")
        return [_coerce(args[0], v, key) for v in value]
    if hint is bool:
        _check(isinstance(value, bool), key, value, "true or false")
    elif hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, value, "an integer")
    elif hint is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "a number")
        return float(value)
    elif hint is str:
        _check(isinstance(value, str), key, value, "a string")
    return value


def load_config(overrides: list[str] | tuple[str, ...] = (), machine: Machine | None = None) -> DistillConfig:
    return validate(compose(list(overrides)), machine)


def to_yaml(cfg: DistillConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(asdict(cfg)))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
