"""Benchmark: how long a sharded checkpoint holds training up, written synchronously against in the
background (trainer.async_save), by real StudentWorker ranks (FSDP2 over gloo, Ray actors) of a real
model, measured in the same run.

For each of `--repeats` rounds, on one group of `--ranks` ranks:
  sync        `StudentWorker.save`: weights and AdamW state written with torch.distributed.checkpoint and
              hashed, every rank waiting until its files are on disk (the old critical path)
  background  `StudentWorker.start_save(..., background=True)`: the shards copied to host memory, then
              the call returns (the new critical path); the writing and hashing go on in a thread
  written     from the start of the background save until every rank has reported its checksums
  update      one optimiser step alone, and one started right after a background save began (what the
              writer's thread costs the training running next to it on the same cores)
Medians over the rounds; ratios against the synchronous save of the same run.

Run:  .venv/bin/python benchmarks/checkpoint_save.py                 # SmolLM2-135M (embedded), 2 ranks
      .venv/bin/python benchmarks/checkpoint_save.py --model DIR --ranks 4 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's opcd, run from anywhere
from json_out import write_json  # noqa: E402  benchmarks/: the script's own folder

from opcd.protocol import UpdateBatch  # noqa: E402
from opcd.runs.checkpoint import written_checksums, written_reports  # noqa: E402
from opcd.workers.group import WorkerGroup, init_ray  # noqa: E402
from opcd.workers.spec import WorkerSpec  # noqa: E402
from opcd.workers.student import StudentWorker  # noqa: E402


def update_batch(rows: int, length: int, k: int, vocab: int) -> UpdateBatch:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(rows, length, dtype=torch.bool)
    return UpdateBatch(prompt_ids=[[1, 2, 3, 4]] * rows, response_ids=torch.randint(10, vocab, (rows, length), generator=g),
                       response_mask=mask, support_ids=torch.randint(10, vocab, (rows, length, k), generator=g),
                       support_mask=None, teacher_logprobs=torch.log_softmax(torch.randn(rows, length, k, generator=g), -1),
                       num_tokens=int(mask.sum()), num_sequences=rows)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a local Hugging Face folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the figures as JSON to this path ('-': stdout)")
    args = parser.parse_args()
    if args.model is None:
        from opcd.models import ensure_builtin_smollm2
        args.model = str(ensure_builtin_smollm2())

    init_ray(None, max(args.ranks, 2))
    spec = WorkerSpec.build(args.model, num_threads=args.threads, micro_batch_size=2, lr=1e-5)
    group = WorkerGroup("bench", StudentWorker, {"spec": spec}, world_size=args.ranks)
    batch = update_batch(rows=2 * args.ranks, length=32, k=16, vocab=1000)
    group.gather(StudentWorker.update, batch)  # AdamW's moments exist from here on (and warm-up)
    root = Path(args.dir or tempfile.mkdtemp(prefix="opcd-save-bench-"))
    figures = {"sync": [], "background": [], "written": [], "update_alone": [], "update_while_writing": []}
    size = 0
    try:
        for round_ in range(args.repeats):
            sync, background = root / f"sync-{round_}", root / f"background-{round_}"
            sync.mkdir(parents=True)
            background.mkdir(parents=True)
            figures["update_alone"].append(timed(lambda: group.gather(StudentWorker.update, batch)))
            figures["sync"].append(timed(lambda: group.call(StudentWorker.save, str(sync))))
            size = folder_bytes(sync)
            start = time.perf_counter()
            answers = group.call(StudentWorker.start_save, str(background), False, True)
            figures["background"].append(time.perf_counter() - start)
            assert answers == [None] * args.ranks, answers
            figures["update_while_writing"].append(timed(lambda: group.gather(StudentWorker.update, batch)))
            while len(written_reports(background, list(range(args.ranks)))) < args.ranks:
                time.sleep(0.01)
            figures["written"].append(time.perf_counter() - start)
            group.call(StudentWorker.finish_save)
            written_checksums(background, list(range(args.ranks)), round_)
            shutil.rmtree(sync)
            shutil.rmtree(background)
    finally:
        group.shutdown()
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    median = {name: statistics.median(values) for name, values in figures.items()}
    print(f"model {args.model}, {args.ranks} gloo ranks, checkpoint {size / 2**20:.0f} MiB "
          f"(weights + AdamW state), {args.repeats} rounds, medians:")
    print(f"  sync save (critical path)              {median['sync']:7.3f} s   1.00")
    print(f"  background save (critical path)        {median['background']:7.3f} s   "
          f"{median['background'] / median['sync']:.2f} of sync")
    print(f"  background save, until written         {median['written']:7.3f} s   "
          f"{median['written'] / median['sync']:.2f} of sync")
    print(f"  update alone                           {median['update_alone']:7.3f} s")
    print(f"  update while the ranks write           {median['update_while_writing']:7.3f} s   "
          f"{median['update_while_writing'] / median['update_alone']:.2f} of alone")
    if args.json:
        write_json({"model": args.model, "ranks": args.ranks, "checkpoint_bytes": size, "seconds": figures,
                    "median_s": median}, args.json)


if __name__ == "__main__":
    main()
