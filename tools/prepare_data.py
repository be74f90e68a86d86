"""Fetch the datasets the paper's commands train and evaluate on, through `datasets`, into ./data.

    python tools/prepare_data.py                        # the seven hub datasets into ./data
    python tools/prepare_data.py --only dapo_train --limit 100 --out /shared/data
    python tools/prepare_data.py --source /mnt/mirror    # a local copy: /mnt/mirror/<name>/ per dataset

The reference's own tools/prepare_data.py loads the same seven hub datasets and writes each one's
`train` split as parquet (method.md §4); so does this, in the same layout, checking every row
first: `content` (chat messages) in all of them; `data_source` and `reward_model.ground_truth` in
the DAPO sets; `answer` in the system-prompt sets. Each `data/<name>.parquet` gets a
`data/<name>.json` beside it naming its source, split, row count and columns.

The launchers (scripts/*.sh) use these files when they are there: DAPO train / validation / test
for math (extraction selects on validation, evaluation uses test) and the sys_* sets for the system
prompts. Offline, every dataset that could not be fetched is listed with its reason, nothing
partial is left behind and the exit code is 1; the launchers then say which bundled or generated
fallback they use.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from opcd.data.rows import check_rows
from opcd.errors import DataError, OpcdError

HUB_SPLIT = "train"  # each of the reference's datasets is one hub dataset with a single train split


@dataclass(frozen=True)
class Source:
    name: str  # the hub dataset ytz20/<name>, written to <out>/<name>.parquet
    columns: tuple[str, ...]  # top-level columns the reference reads; missing -> an error

    @property
    def hub_id(self) -> str:
        return f"ytz20/{self.name}"


_DAPO = ("content", "data_source", "reward_model")
_SYS = ("content", "answer")
SOURCES = (
    Source("dapo_train", _DAPO),
    Source("dapo_validation", _DAPO),  # the held-out 900 that extraction selects on
    Source("dapo_test", _DAPO),  # the math evaluation reads its first 1,000
    Source("sys_medmcqa_train", _SYS),
    Source("sys_medmcqa_test", _SYS),
    Source("sys_safety_train", _SYS),
    Source("sys_safety_test", _SYS),
)


def load(source: Source, root: Path | None, limit: int | None):
    """The dataset as `datasets` loads it: from the hub, or from `root/<name>/` (a folder laid out as
    the hub repository is, e.g. `data/train-00000-of-00001.parquet`): one code path for both."""
    import datasets  # slow to import: only here

    path = source.hub_id if root is None else str(root / source.name)
    try:
        dataset = datasets.load_dataset(path, split=HUB_SPLIT)
    except Exception as error:  # network, missing dataset or split: all reported on one line
        reason = f"{type(error).__name__}: {error}".replace("\n", " ")
        raise DataError(f"cannot load {path} split {HUB_SPLIT!r}: {reason}") from None
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset, path


def convert(source: Source, dataset, label: str) -> None:
    """Raise DataError unless `dataset` has the reference's layout and every row loads in opcd."""
    missing = [c for c in source.columns if c not in dataset.column_names]
    if missing:
        raise DataError(f"{label}: missing column(s) {', '.join(missing)} (expected {', '.join(source.columns)}; "
                        f"found {', '.join(dataset.column_names)})")
    if "reward_model" in source.columns:
        for number, row in enumerate(dataset, start=1):
            if not isinstance(row["reward_model"], dict) or "ground_truth" not in row["reward_model"]:
                raise DataError(f"{label} row {number}: field 'reward_model.ground_truth' missing")
    check_rows(dataset, label)  # content, roles, answer: the checks opcd runs when it loads the file


def write(source: Source, dataset, origin: str, out: Path) -> Path:
    """`out/<name>.parquet` (renamed into place when complete) and its `out/<name>.json` description."""
    target = out / f"{source.name}.parquet"
    tmp = out / f".{source.name}.parquet.tmp"
    dataset.to_parquet(str(tmp))
    tmp.replace(target)  # a failed run never leaves a half-written file under the final name
    about = {"source": origin if origin.startswith("/") else f"hf:{origin}", "split": HUB_SPLIT,
             "rows": len(dataset), "columns": list(dataset.column_names), "written_by": "tools/prepare_data.py"}
    (out / f"{source.name}.json").write_text(json.dumps(about, indent=1) + "\n")
    return target


def prepare(sources, out: Path, limit: int | None = None, root: Path | None = None) -> list[str]:
    """Load, check and write each source; returns one line per failure (empty when all succeeded)."""
    out.mkdir(parents=True, exist_ok=True)
    failures = []
    for source in sources:
        try:
            dataset, origin = load(source, root, limit)
            convert(source, dataset, origin)
            target = write(source, dataset, str(Path(origin).resolve()) if root else origin, out)
            print(f"wrote {target} ({len(dataset)} rows from {origin})")
        except (OpcdError, OSError) as exc:
            failures.append(f"{source.name}: {exc}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data", help="output folder (default: ./data, where the launchers look)")
    parser.add_argument("--only", nargs="*", choices=[s.name for s in SOURCES], help="datasets to fetch (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="rows per dataset (default: all)")
    parser.add_argument("--source", type=Path, default=None,
                        help="read <SOURCE>/<name>/ (a local copy laid out as the hub repository) instead of the hub")
    args = parser.parse_args(argv)
    chosen = [s for s in SOURCES if not args.only or s.name in args.only]
    failures = prepare(chosen, Path(args.out), args.limit, args.source)
    for line in failures:
        print(f"prepare_data: failed: {line}", file=sys.stderr)
    if failures:
        print(f"prepare_data: {len(failures)} of {len(chosen)} dataset(s) not written (offline? the hub must be "
              "reachable, or give --source); the launchers fall back to bundled samples / generated problems",
              file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
