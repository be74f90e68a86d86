"""Where a task's rows come from: bundled sets, local files, hub datasets and reasoning-gym.

Sources accepted by `load_rows`:
* ``bundled:<name>``: ``opcd/data/bundled/<name>.jsonl`` shipped with the package;
* a path ending ``.jsonl`` or ``.json`` (JSON lines; a ``.json`` file holding a
  single JSON array also works) or ``.parquet``;
* ``hf:<dataset_id>``: a hub dataset, with `split` (default "train"); one without a ``content`` column
  is turned into rows by its task's converter (`HUB_CONVERTERS`);
* ``rg:<generator>``: offline problems from reasoning-gym (e.g. ``rg:gsm_symbolic``); `split`
  picks the seed (train / validation / test never overlap by seed), `limit` the size (default 256).

Every row is checked against the layout of `opcd/data/rows.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from opcd.errors import ConfigError, DataError
from opcd.data.rows import BUNDLED_PREFIX, bundled_path, check_rows, read_file_rows
from opcd.tasks.math import reasoning_gym_rows
from opcd.tasks.sysprompt import medmcqa_row

HUB_PREFIX = "hf:"
REASONING_GYM_PREFIX = "rg:"
REASONING_GYM_SEEDS = {"train": 1, "validation": 2, "test": 3}
REASONING_GYM_DEFAULT_SIZE = 256
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")

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


