"""Dataset rows: their layout, checking them, and reading them from local or bundled files. Pure; where
a task's rows come from (hub datasets, generators) is `opcd/tasks/loading.py`.

A row is a dict with
* ``content``: a non-empty list of chat messages ``{"role", "content"}``
  (roles system/user/assistant) ending with a user message;
* ``answer``: the ground truth as a string, or None where the task allows it.
Any other columns are kept as they are.

Rows in the DAPO math layout (``prompt`` instead of ``content``, the ground truth in
``reward_model.ground_truth``) are normalised to the layout above.
"""

import json
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from opcd.errors import ConfigError, DataError
from opcd.data.files import check_unicode, read_text

ROLES = ("system", "user", "assistant")
BUNDLED_PREFIX = "bundled:"


def bundled_dir() -> Path:
    """Folder of the datasets shipped inside the package."""
    return Path(str(files("opcd") / "data" / "bundled"))


def bundled_names() -> list[str]:
    """Names usable as ``bundled:<name>``."""
    folder = bundled_dir()
    return sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []


def to_python(value: Any) -> Any:
    """`value` with numpy arrays and scalars (as pandas/parquet may return them) turned into Python objects."""
    if isinstance(value, np.ndarray):
        return [to_python(item) for item in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: to_python(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(item) for item in value]
    return value


def _type_name(value: Any) -> str:
    """How a bad value is described in errors: its type, or "empty list"."""
    if isinstance(value, list) and not value:
        return "empty list"
    return "null" if value is None else type(value).__name__


def check_message(message: Any, where: str, position: int) -> None:
    """Raise DataError unless `message` is a {role, content} chat message."""
    field = f"content[{position}]"
    if not isinstance(message, dict):
        raise DataError(f"{where}: field '{field}' must be a {{role, content}} message, got {_type_name(message)}")
    role = message.get("role")
    if role not in ROLES:
        raise DataError(f"{where}: field '{field}.role' must be one of {', '.join(ROLES)}, got {role!r}")
    if not isinstance(message.get("content"), str):
        got = _type_name(message.get("content")) if "content" in message else "nothing"
        raise DataError(f"{where}: field '{field}.content' must be a string, got {got}")


def normalise_row(row: Any) -> Any:
    """DAPO math layout -> ours: `prompt` becomes `content`, `reward_model.ground_truth` the `answer`."""
    if not isinstance(row, dict):
        return row
    if "content" not in row and isinstance(row.get("prompt"), list):
        row = {**row, "content": row["prompt"]}
    reward_model = row.get("reward_model")
    if "answer" not in row and isinstance(reward_model, dict) and "ground_truth" in reward_model:
        truth = reward_model["ground_truth"]
        row = {**row, "answer": truth if truth is None or isinstance(truth, str) else str(truth)}
    return row


def check_row(row: Any, where: str) -> dict:
    """`row` itself if it is a valid dataset row; otherwise DataError naming `where` and the field."""
    row = normalise_row(row)
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields 'content' and 'answer', got {_type_name(row)}")
    if "content" not in row:
        raise DataError(f"{where}: missing field 'content' (expected a non-empty list of {{role, content}} messages)")
    content = row["content"]
    if not isinstance(content, list) or not content:
        raise DataError(
            f"{where}: field 'content' must be a non-empty list of {{role, content}} messages, "
            f"got {_type_name(content)}"
        )
    for position, message in enumerate(content):
        check_message(message, where, position)
    if content[-1]["role"] != "user":
        raise DataError(f"{where}: field 'content' must end with a user message, got last role {content[-1]['role']!r}")
    if "answer" not in row:
        raise DataError(f"{where}: missing field 'answer' (expected a string, or null where the task allows it)")
    if row["answer"] is not None and not isinstance(row["answer"], str):
        answer = row["answer"]
        raise DataError(f"{where}: field 'answer' must be a string or null, got {_type_name(answer)} {answer!r}")
    return row


def check_rows(rows: Iterable[Any], label: str) -> list[dict]:
    """Every row normalised and checked; rows are numbered from 1 in errors, as "<label> row N"."""
    return [check_row(to_python(row), f"{label} row {number}") for number, row in enumerate(rows, start=1)]


def read_json_rows(path: Path) -> list[Any]:
    """Rows of a JSON-lines file (blank lines skipped), or of a .json file holding one array."""
    text = read_text(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        rows = _loads(text, f"{path}")
        for number, row in enumerate(rows if isinstance(rows, list) else [], start=1):
            check_unicode(row, f"{path} row {number}")
        return rows
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        rows.append(_loads(line, f"{path} line {line_number}"))
        check_unicode(rows[-1], f"{path} line {line_number}")
    return rows


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        at = f" at line {error.lineno}" if " line " not in where else ""
        raise DataError(f"{where}: invalid JSON ({error.msg}{at})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read") from None


def read_parquet_rows(path: Path) -> list[Any]:
    """Rows of a parquet file as Python dicts."""
    import pyarrow.parquet as pq  # imported here: only parquet sources need it

    try:
        return pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several types for unreadable files
        reason = f"{type(error).__name__}: {error}".replace("\n", " ")
        raise DataError(f"{path}: cannot read parquet file ({reason})") from None


def read_file_rows(path: Path) -> list[Any]:
    """Raw rows of a local dataset file, chosen by its suffix."""
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    if path.suffix == ".parquet":
        return read_parquet_rows(path)
    return read_json_rows(path)


def bundled_path(name: str) -> Path:
    """File of the bundled dataset `name`."""
    path = bundled_dir() / f"{name}.jsonl"
    if not path.is_file():
        raise DataError(f"unknown bundled dataset {name!r}; available: {', '.join(bundled_names()) or 'none'}")
    return path


def shuffled_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n), the same for the same (seed, epoch) and different across epochs."""
    if n < 0 or seed < 0 or epoch < 0:
        raise ConfigError(f"shuffled_order needs non-negative n, seed and epoch, got n={n}, seed={seed}, epoch={epoch}")
    return np.random.default_rng((seed, epoch)).permutation(n).tolist()
