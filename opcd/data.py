"""Dataset rows: loading them from bundled sets, local files or the Hugging Face hub, and checking them.

A row is a dict with
* ``content``: a non-empty list of chat messages ``{"role", "content"}``
  (roles system/user/assistant) ending with a user message;
* ``answer``: the ground truth as a string, or None where the task allows it.
Any other columns are kept as they are.

Sources accepted by `load_rows`:
* ``bundled:<name>``: ``opcd/data/<name>.jsonl`` shipped with the package;
* a path ending ``.jsonl`` or ``.json`` (JSON lines; a ``.json`` file holding a
  single JSON array also works) or ``.parquet``;
* ``hf:<dataset_id>``: a hub dataset, with `split` (default "train");
* ``rg:<generator>``: offline problems from reasoning-gym (e.g. ``rg:gsm_symbolic``); `split`
  picks the seed (train / validation / test never overlap by seed), `limit` the size (default 256).

Rows in the DAPO math layout (``prompt`` instead of ``content``, the ground truth in
``reward_model.ground_truth``) are normalised to the layout above.
"""

import json
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from opcd.errors import ConfigError, DataError
from opcd.tasks.sysprompt import CHOICE_LETTERS, medmcqa_user_message
from opcd.userfiles import check_unicode, read_text

ROLES = ("system", "user", "assistant")
BUNDLED_PREFIX = "bundled:"
HUB_PREFIX = "hf:"
REASONING_GYM_PREFIX = "rg:"
REASONING_GYM_SEEDS = {"train": 1, "validation": 2, "test": 3}
REASONING_GYM_DEFAULT_SIZE = 256
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def bundled_dir() -> Path:
    """Folder of the datasets shipped inside the package."""
    return Path(str(files("opcd") / "data"))


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


def medmcqa_row(record: dict, where: str) -> dict:
    """A dataset row built from an `openlifescienceai/medmcqa` record; its columns are kept."""
    cop = record.get("cop")
    if not isinstance(cop, int) or not 0 <= cop <= 3:
        # The hub's test split hides the labels (cop = -1); its validation split has them.
        raise DataError(
            f"{where}: field 'cop' must be an option index 0-3, got {cop!r} "
            "(the test split has no labels; use 'validation')"
        )
    options = [record[key] for key in ("opa", "opb", "opc", "opd")]
    return {
        **record,
        "content": [{"role": "user", "content": medmcqa_user_message(record["question"], options)}],
        "answer": CHOICE_LETTERS[cop],
    }


# Hub datasets that lack a `content` column but that we know how to convert.
HUB_CONVERTERS: dict[str, Callable[[dict, str], dict]] = {
    "openlifescienceai/medmcqa": medmcqa_row,
}


def load_hub_rows(dataset_id: str, split: str, limit: int | None) -> list[dict]:
    """Rows of a Hugging Face hub dataset, converted when it has no `content` column."""
    import datasets  # imported here: it is slow to import and only hub sources need it

    try:
        dataset = datasets.load_dataset(dataset_id, split=split)
    except Exception as error:  # network, missing dataset or split: all reported the same way
        reason = f"{type(error).__name__}: {error}".replace("\n", " ")  # keep the message on one line
        raise DataError(f"cannot load hub dataset {dataset_id!r} split {split!r}: {reason}") from None
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    label = f"hf:{dataset_id}[{split}]"
    if "content" in dataset.column_names:
        return check_rows(dataset, label)
    converter = HUB_CONVERTERS.get(dataset_id)
    if converter is None:
        raise DataError(
            f"hub dataset {dataset_id!r} has no 'content' column and no converter; "
            f"columns found: {', '.join(dataset.column_names)}"
        )
    return check_rows((converter(dict(record), f"{label} row {n}") for n, record in enumerate(dataset, start=1)), label)


def load_reasoning_gym_rows(name: str, split: str, limit: int | None) -> list[dict]:
    from opcd.tasks.math import reasoning_gym_rows

    if split not in REASONING_GYM_SEEDS:
        raise DataError(f"rg:{name}: split must be one of {', '.join(REASONING_GYM_SEEDS)}, got {split!r}")
    size = REASONING_GYM_DEFAULT_SIZE if limit is None else limit
    return check_rows(reasoning_gym_rows(name, size, REASONING_GYM_SEEDS[split]), f"rg:{name}[{split}]")


def load_rows(source: str, split: str | None = None, limit: int | None = None) -> list[dict]:
    """Checked rows from `source` (see the module docstring); at most `limit` of them, in order.

    `split` only applies to hub datasets; files and bundled sets are one split each.
    """
    if limit is not None and limit < 0:
        raise ConfigError(f"dataset limit must be >= 0 or null, got {limit} for {source}")
    if source.startswith(HUB_PREFIX):
        return load_hub_rows(source[len(HUB_PREFIX):], split or "train", limit)
    if source.startswith(REASONING_GYM_PREFIX):
        return load_reasoning_gym_rows(source[len(REASONING_GYM_PREFIX):], split or "train", limit)
    if source.startswith(BUNDLED_PREFIX):
        path = bundled_path(source[len(BUNDLED_PREFIX):])
        label = f"{BUNDLED_PREFIX}{path.stem}"
    elif source.endswith(FILE_SUFFIXES):
        path, label = Path(source), source
    else:
        raise DataError(
            f"unsupported dataset source {source!r}: expected bundled:<name>, hf:<dataset_id>, "
            "rg:<generator>, or a .jsonl/.json/.parquet path"
        )
    rows = read_file_rows(path)
    return check_rows(rows[:limit] if limit is not None else rows, label)


def shuffled_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n), the same for the same (seed, epoch) and different across epochs."""
    if n < 0 or seed < 0 or epoch < 0:
        raise ConfigError(f"shuffled_order needs non-negative n, seed and epoch, got n={n}, seed={seed}, epoch={epoch}")
    return np.random.default_rng((seed, epoch)).permutation(n).tolist()
