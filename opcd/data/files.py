"""Reading files the user hands us (datasets, contexts, game states, run configs) with one-line errors.

Python's own failures here are tracebacks that do not name the file: a non-UTF-8 byte is a
`UnicodeDecodeError` from deep in `codecs`, a JSON array nested a few thousand deep is a
`RecursionError`, and a JSON string may hold a lone surrogate (`"\\ud800"`) that only fails later
inside the tokenizer. These helpers turn the first and the last into the caller's error type (DataError,
ContextError, ConfigError) with the path and the position; readers catch RecursionError themselves
next to their JSON errors.
"""

from __future__ import annotations

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
