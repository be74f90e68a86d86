"""Reading files the user hands us (datasets, contexts, game states, run configs) with one-line errors.

Python's own failures here are tracebacks that do not name the file: a non-UTF-8 byte is a
`UnicodeDecodeError` from deep in `codecs`, a JSON array nested a few thousand deep is a
`RecursionError`, and a JSON string may hold a lone surrogate (`"\\ud800"`) that only fails later
inside the tokenizer. These helpers turn the first and the last into the caller's error type (DataError,
ContextError, ConfigError) with the path and the position; readers catch RecursionError themselves
next to their JSON errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from opcd.errors import DataError


def read_text(path: str | Path, error: type[Exception] = DataError) -> str:
    """The file's text, which must be UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}): "
                    f"expected a UTF-8 file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None


def check_unicode(value: Any, where: str, error: type[Exception] = DataError) -> None:
    """Refuse strings that are not valid Unicode text (a lone surrogate cannot be encoded or tokenized)."""
    stack = [value]
    while stack:  # iterative: a value that parsed may still be too deep for recursion here
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise error(f"{where}: text holds a lone surrogate {item[exc.start]!r} at character {exc.start} "
                            f"(expected valid Unicode text)") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _json_reason(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, ValueError) and hasattr(exc, "msg"):  # json.JSONDecodeError
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return " ".join(str(exc).split())[:200]


def read_json(path: str | Path, error: type[Exception] = DataError, expected: str = "a JSON object") -> dict:
    """A JSON file opcd wrote (eval.json, summaries, caches, results): its top-level object.

    A half-written file (a crash mid-write of a file not written atomically, or one damaged by hand) is
    one `error` line naming the file and the problem, never a `JSONDecodeError` traceback."""
    text = read_text(path, error)
    if not text.strip():
        raise error(f"{path}: empty file (expected {expected})")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise error(f"{path}: not valid JSON ({_json_reason(exc)}); expected {expected}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: holds a JSON {type(value).__name__}, expected {expected}")
    return value


def read_jsonl(path: str | Path, required: tuple[str, ...] = (), error: type[Exception] = DataError,
               warn=None) -> list[dict]:
    """The objects of a JSON-lines file opcd appends to (metrics.jsonl), each holding the `required` keys.

    kill -9 in the middle of an append leaves a torn LAST line: it is skipped with one warning through
    `warn` (the lines before it are whole). Any other bad line means the file was damaged otherwise, so
    it is one `error` line naming file:line and what was expected."""
    lines = read_text(path, error).splitlines()
    # blank lines carry nothing; the numbering stays the file's own
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    what = "a JSON object" + (f" with {', '.join(repr(k) for k in required)}" if required else "")
    rows = []
    for index, (number, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:
            if index == len(numbered) - 1 and isinstance(exc, ValueError):
                if warn is not None:
                    warn(f"{path}:{number}: last line cut short (a crash while writing?); skipped it, "
                         f"the {len(rows)} lines before it are read")
                break
            raise error(f"{path}:{number}: not valid JSON ({_json_reason(exc)}); expected {what}") from None
        if not isinstance(row, dict):
            raise error(f"{path}:{number}: a JSON {type(row).__name__}, expected {what}")
        missing = [key for key in required if key not in row]
        if missing:
            raise error(f"{path}:{number}: no {', '.join(repr(k) for k in missing)}; expected {what}")
        rows.append(row)
    return rows


# A YAML file of ours has a few hundred nodes. An "anchor bomb" (aliases of aliases of aliases) parses
# quickly into shared objects, but every later walk (OmegaConf, the settings comparison) expands it to
# billions of nodes and spins for minutes: count the expanded nodes from the parser's events first.
YAML_MAX_BYTES = 4 << 20
YAML_MAX_NODES = 200_000


def _expanded_nodes(text: str, limit: int) -> int:
    """How many nodes the YAML text holds once every alias is expanded; stops counting past `limit`."""
    import yaml

    sizes: dict[str, int] = {}  # anchor -> expanded size of the node it names
    stack = [[None, 0]]  # [anchor, nodes so far] per open collection; the bottom one is the document
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            stack.append([event.anchor, 1])
            continue
        if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, size = stack.pop()
        elif isinstance(event, yaml.ScalarEvent):
            anchor, size = event.anchor, 1
        elif isinstance(event, yaml.AliasEvent):
            anchor, size = None, sizes.get(event.anchor, 1)
        else:
            continue
        if anchor is not None:
            sizes[anchor] = size
        stack[-1][1] += size
        if stack[-1][1] > limit or sum(count for _, count in stack) > limit:
            return limit + 1
    return stack[0][1]


def read_yaml(path: str | Path, error: type[Exception] = DataError) -> object:
    """A YAML file (a run's config.yaml) parsed safely: bounded size and expanded node count, one-line errors."""
    import yaml

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    if size > YAML_MAX_BYTES:
        raise error(f"{path}: {size} bytes, expected a config under {YAML_MAX_BYTES} bytes")
    text = read_text(path, error)
    try:
        if _expanded_nodes(text, YAML_MAX_NODES) > YAML_MAX_NODES:
            raise error(f"{path}: more than {YAML_MAX_NODES} nodes once its aliases are expanded "
                        f"(an alias bomb?); expected a config of a few hundred")
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as exc:
        reason = " ".join(str(exc).split())[:200] or "nested too deeply"
        raise error(f"{path}: not readable YAML ({reason})") from None
