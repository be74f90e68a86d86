"""The configuration reference, generated from the schema: every key with its type, default, allowed
values and one-line description, plus the presets of each config group.

The descriptions are the comments written beside (or just above) each field in opcd/config/schema.py,
and the allowed values come from the field's `Literal` type or from the bounds its `_check` calls state,
so the reference cannot drift from the code. Defaults are the schema's own (the class defaults, before
any `auto` or `null` is resolved for the machine at start-up), so the text is the same on every machine.

Run: python -m opcd.config.reference > docs/config.md   (tests/config/test_reference.py checks it is current)
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import io
import tokenize
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

import yaml

from opcd.config import schema
from opcd.config.hints import group_options

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
REGENERATE = "python -m opcd.config.reference > docs/config.md"


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """{(class name, field name): comment} from a module's source: the comment on the field's line, else
    the comment lines directly above it (joined)."""
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            text = comments.get(stmt.end_lineno)
            if text is None:  # a block of comment-only lines right above the field
                above, line = [], stmt.lineno - 1
                while line in comments and lines[line - 1].lstrip().startswith("#"):
                    above.insert(0, comments[line])
                    line -= 1
                text = " ".join(above)
            out[(node.name, stmt.target.id)] = text
    return out


def _expected_text(node: ast.expr, namespace: dict) -> str:
    """The text of a `_check` call's expectation: a constant as it is; in an f-string, a placeholder that
    needs only module-level names is filled in, one that depends on the value checked stays `{...}`."""
    if isinstance(node, ast.Constant):
        return node.value
    parts = []
    for value in node.values:  # an ast.JoinedStr
        if isinstance(value, ast.Constant):
            parts.append(value.value)
            continue
        try:
            parts.append(str(eval(compile(ast.Expression(value.value), "<schema>", "eval"), dict(namespace))))
        except NameError:  # needs the instance: say which expression
            parts.append("{" + ast.unparse(value.value).replace("self.", "") + "}")
    return "".join(parts)


def _imported_names(source: str) -> dict:
    """The module's `from X import Y` names (also those imported inside functions), loaded."""
    names = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            module = importlib.import_module(node.module)
            names.update({a.asname or a.name: getattr(module, a.name) for a in node.names
                          if hasattr(module, a.name)})
    return names


def checked_bounds(source: str, namespace: dict) -> dict[str, list[str]]:
    """{dotted key: [expected, ...]} from the `_check(ok, "key", value, "expected")` calls of a module,
    f-strings filled in from `namespace` (see `_expected_text`)."""
    out: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_check"
                and len(node.args) == 4 and isinstance(node.args[1], ast.Constant)):
            continue
        text = _expected_text(node.args[3], namespace)
        out.setdefault(node.args[1].value, [])
        if text not in out[node.args[1].value]:
            out[node.args[1].value].append(text)
    return out


def _type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "choice"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = _type_name(args[0]) if len(args) == 1 else " | ".join(_type_name(a) for a in args)
        return f"{inner} or null"
    if typing.get_origin(hint) is list:
        return f"list[{_type_name(args[0])}]"
    return getattr(hint, "__name__", str(hint))


def _default(f) -> object:
    if f.default is not MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _yaml_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return str(value)


def _allowed(hint, key: str, bounds: dict[str, list[str]]) -> str:
    choices = [a for a in typing.get_args(hint) if a is not type(None)]
    literal = next((c for c in choices if typing.get_origin(c) is typing.Literal), None)
    if typing.get_origin(hint) is typing.Literal:
        literal = hint
    parts = []
    if literal is not None:
        parts.append(", ".join(f"`{_yaml_value(v)}`" for v in typing.get_args(literal))
                     + (", `null`" if literal is not hint else ""))
    elif hint is bool or bool in choices:
        parts.append("`true`, `false`" + (", `null`" if hint is not bool else ""))
    parts += bounds.get(key, [])
    return "; ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def key_rows(cls=schema.DistillConfig, prefix: str = "") -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, allowed, description) for every value of the schema, in schema order."""
    source = Path(inspect.getsourcefile(schema)).read_text()
    comments = field_comments(source)
    bounds = checked_bounds(source, {**vars(schema), **_imported_names(source)})
    rows = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        if is_dataclass(hint):
            rows += key_rows(hint, key + ".")
            continue
        # the comments speak Python (None); a user writes YAML (null)
        text = re.sub(r"\bNone\b", "null", comments.get((cls.__name__, f.name), ""))
        rows.append((key, _type_name(hint), _yaml_value(_default(f)), _allowed(hint, key, bounds), text))
    return rows


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in data.items():
        if isinstance(value, dict):
            out += _flatten(value, f"{prefix}{key}.")
        elif key != "defaults":
            out.append((f"{prefix}{key}", value))
    return out


def preset_rows(conf_dir: Path = CONF_DIR) -> list[tuple[str, str]]:
    """(group=preset, the keys it sets) for every preset file; a preset file's keys are relative to its
    group unless it is marked `# @package _global_`."""
    rows = []
    for group, names in group_options(conf_dir).items():
        for name in names:
            text = (conf_dir / group / f"{name}.yaml").read_text()
            prefix = "" if "@package _global_" in text else f"{group}."
            values = _flatten(yaml.safe_load(text) or {}, prefix)
            rows.append((f"{group}={name}", ", ".join(f"`{k}={_yaml_value(v)}`" for k, v in values)))
    return rows


def render() -> str:
    """The whole of docs/config.md."""
    lines = [
        "# Configuration reference",
        "",
        f"Generated from `opcd/config/schema.py` by `{REGENERATE}`; do not edit by hand",
        "(`tests/config/test_reference.py` fails when this file and the schema disagree).",
        "",
        "Every key can be set on the command line in Hydra syntax (`opcd distill trainer.exp_name=lr-test trainer.lr=5e-6`);",
        "`opcd distill --cfg` prints the resolved, validated config. Defaults are the schema's; the presets",
        "below change some of them (`opcd distill` starts from `model=smollm2 rollout=auto trainer=demo",
        "task=language`). `null` and `auto` values are decided at start-up, in one step",
        "(`opcd/config/resolve.py`), from the machine: the GPUs this node shows and whether vLLM is installed,",
        "or what `OPCD_NUM_GPUS` and `OPCD_VLLM` (0 or 1) say, so `OPCD_NUM_GPUS=8 OPCD_VLLM=1 opcd distill",
        "--cfg ray.nnodes=2 ray.address=auto` prints on a laptop what a 2x8 cluster runs. `--cfg` shows the",
        "decision. A value outside what is allowed stops the run with one line naming the key.",
        "",
        "## Keys",
        "",
        "| key | type | default | allowed | description |",
        "|---|---|---|---|---|",
    ]
    for key, kind, default, allowed, text in key_rows():
        lines.append(f"| `{key}` | {kind} | `{_cell(default)}` | {_cell(allowed)} | {_cell(text)} |")
    lines += ["", "## Presets", "", "Chosen with `GROUP=NAME` (e.g. `task=math`); each sets these keys:", "",
              "| preset | sets |", "|---|---|"]
    lines += [f"| `{name}` | {_cell(values)} |" for name, values in preset_rows()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
