"""Download every dataset the tasks use and write them as parquet in the layout opcd reads
(`content` chat messages + `answer`), one file per split, into a data folder.

    python tools/prepare_data.py                 # all datasets into ./data
    python tools/prepare_data.py --only medmcqa --out /shared/data

Needs access to the Hugging Face hub. Offline, every dataset that could not be fetched is listed
with the reason, nothing partial is left behind, and the exit code is 1. Point the tasks at the
files with e.g. `task.train_data=data/medmcqa_train.parquet`. Offline runs need none of this:
the bundled samples and `rg:` generators work without a network.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from opcd.errors import OpcdError
from opcd.tasks.loading import load_rows


@dataclass(frozen=True)
class Source:
    name: str  # output file prefix: <name>_<split>.parquet
    dataset: str  # hf:<id> (converted by opcd/tasks/loading.py when it has no `content` column)
    splits: dict[str, str]  # our split name -> the hub's split name


SOURCES = (
    # DAPO math training problems (prompt + reward_model.ground_truth, normalised on load)
    Source("dapo_math", "hf:BytedTsinghua-SIA/DAPO-Math-17k", {"train": "train"}),
    # MedMCQA: the hub's test split has no labels, so its validation split serves as our test split
    Source("medmcqa", "hf:openlifescienceai/medmcqa", {"train": "train", "test": "validation"}),
)
# The reference's safety statements and its re-published DAPO validation/test splits are not public
# hub datasets we can name; bring them as parquet/jsonl in the same layout (content + answer).


def write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(path)  # a failed run never leaves a half-written file under the final name


def prepare(sources, out: Path, limit: int | None, load=None) -> list[str]:
    """Fetch and write each source; returns one line per failure (empty when all succeeded)."""
    load = load or load_rows
    out.mkdir(parents=True, exist_ok=True)
    failures = []
    for source in sources:
        for ours, theirs in source.splits.items():
            target = out / f"{source.name}_{ours}.parquet"
            try:
                rows = load(source.dataset, theirs, limit)
                write_parquet(rows, target)
                print(f"wrote {target} ({len(rows)} rows)")
            except (OpcdError, OSError) as exc:
                failures.append(f"{source.dataset} split {theirs}: {exc}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data", help="output folder (default: ./data)")
    parser.add_argument("--only", nargs="*", choices=[s.name for s in SOURCES], help="datasets to fetch")
    parser.add_argument("--limit", type=int, default=None, help="rows per split (default: all)")
    args = parser.parse_args(argv)
    chosen = [s for s in SOURCES if not args.only or s.name in args.only]
    failures = prepare(chosen, Path(args.out), args.limit)
    for line in failures:
        print(f"prepare_data: failed: {line}", file=sys.stderr)
    if failures:
        print(f"prepare_data: {len(failures)} split(s) not written (offline? the hub must be reachable); "
              "the bundled samples and rg: generators need no download", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
