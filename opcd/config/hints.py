"""Did-you-mean for configuration keys: one line naming an unknown key and the nearest known one.

Hydra answers a misspelt override (`trainer.total_trainng_steps=3`) with advice to append it with
`+`, which only adds a key that the schema then refuses. `check_overrides` runs before Hydra
composes: every override's key (with or without `+`, `++`, `~`) must be a key of the schema, and a
group choice (`task=...`) one of the preset files; otherwise one line says which, with the closest
spelling found by difflib.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

from opcd.errors import ConfigError


def schema_keys(cls, prefix: str = "", sections: bool = True) -> list[str]:
    """Every dotted key of the dataclass schema `cls`, sections included ("trainer", "trainer.lr", ...)
    unless `sections` is False (the values only)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        if is_dataclass(hints[f.name]):
            keys.extend(([key] if sections else []) + schema_keys(hints[f.name], key + ".", sections))
        else:
            keys.append(key)
    return keys


def unknown_key_message(key: str, known: list[str]) -> str:
    """'unknown key K; did you mean M?' or, with nothing close, the known keys of K's nearest section."""
    section, _, leaf = key.rpartition(".")
    if section in known or not section:  # a known section: compare the last name with its siblings only
        prefix = f"{section}." if section else ""
        siblings = [k[len(prefix):] for k in known if k.startswith(prefix) and "." not in k[len(prefix):]]
        close = [prefix + c for c in difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)]
    else:  # a misspelt section: compare whole keys of the same depth
        close = difflib.get_close_matches(key, [k for k in known if k.count(".") == key.count(".")], n=1,
                                          cutoff=0.6)
    if close:
        return f"unknown key {key}; did you mean {close[0]}?"
    while section and section not in known:
        section = section.rpartition(".")[0]
    prefix = f"{section}." if section else ""
    children = sorted(k[len(prefix):] for k in known if k.startswith(prefix) and "." not in k[len(prefix):])
    where = f"in {section}" if section else "at the top level"
    return f"unknown key {key} (known keys {where}: {', '.join(children)})"


def group_options(conf_dir: Path) -> dict[str, list[str]]:
    """Preset files per config group: {"task": ["language", "math", ...], ...}."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(conf_dir.iterdir()) if d.is_dir()}


def check_overrides(overrides: list[str], schema, conf_dir: Path) -> None:
    """Raise ConfigError for an override whose key is not in `schema` or whose preset is not in `conf_dir`.

    Overrides Hydra cannot parse are left to Hydra, which names the syntax error itself.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # noqa: BLE001 - Hydra reports the syntax error when it composes
        return
    known = schema_keys(schema)
    groups = group_options(conf_dir)
    for override in parsed:
        key = override.key_or_group
        if key == "hydra" or key.startswith("hydra."):
            continue  # Hydra's own settings
        if key not in known:
            raise ConfigError(f"config: {unknown_key_message(key, known)}")
        value = None if override.is_delete() else override.value()
        if key in groups and isinstance(value, str) and value not in groups[key]:
            close = difflib.get_close_matches(value, groups[key], n=1, cutoff=0.6)
            hint = f"; did you mean {key}={close[0]}?" if close else ""
            raise ConfigError(f"config: unknown {key} preset {value!r}{hint} (presets: {', '.join(groups[key])})")
