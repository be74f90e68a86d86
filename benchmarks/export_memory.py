"""Benchmark: rank 0's peak extra host memory and the bytes written by a Hugging Face export of an
FSDP2-sharded model, old (`full_state_dict`: every tensor gathered to rank 0 in the training dtype,
then `save_pretrained(state_dict=...)`) against new (opcd/workers/hf_export.py: one tensor at a time,
cast to the export dtype, one safetensors shard held), measured in the same run on 2 gloo ranks (CPU).

The model is trained in fp32 (the fp32 master weights of a GPU run) and exported in `--dtype`. Peak
extra memory: rank 0's resident-set high-water mark (reset through /proc/self/clear_refs before each
export) less its resident set at the reset; also the bytes of the tensors rank 0 holds at most (the
whole gathered state for the old path, the largest shard plus the tensor that closes it for the new).

Run:  .venv/bin/python benchmarks/export_memory.py                      # the built-in SmolLM2-135M
      .venv/bin/python benchmarks/export_memory.py --model PATH --dtype bfloat16 --shard-mb 50 --json out.json
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's opcd, run from anywhere
from json_out import write_json  # noqa: E402  benchmarks/: the script's own folder

from opcd.workers.distributed import Rendezvous  # noqa: E402

MB = 1e6


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_extra_mb(run) -> float:
    """Rank 0's resident high-water mark during `run()` above its resident set before it."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = _status_kb("VmRSS")
    run()
    return (_status_kb("VmHWM") - before) * 1e3 / MB


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / MB


def _files(folder: Path) -> int:
    return len(list(folder.glob("*.safetensors")))


def _rank(rank: int, args, rendezvous: Rendezvous, out: str) -> None:
    from opcd.models import load_causal_lm, load_tokenizer, resolve_model
    from opcd.runs.hf_files import tied_names
    from opcd.workers import distributed as D
    from opcd.workers.hf_export import export_sharded_model

    torch.set_num_threads(1)
    D.init_process_group(rendezvous, rank, 2, torch.device("cpu"))
    path = resolve_model(args.model)
    model = D.shard(load_causal_lm(path, "float32"))
    tokenizer = load_tokenizer(path)
    dtype, out = getattr(torch, args.dtype), Path(out)
    shard_bytes = int(args.shard_mb * MB)
    new = _peak_extra_mb(lambda: export_sharded_model(model, tokenizer, out / "new", rank, dtype, shard_bytes))

    def old():
        state = D.full_state_dict(model)
        if rank == 0:
            model.save_pretrained(out / "old", state_dict=state)

    old_peak = _peak_extra_mb(old)
    if rank == 0:
        sizes = {n: t.numel() * t.element_size() for n, t in model.state_dict().items()}
        held_old = sum(sizes.values())
        tied = tied_names(model)
        cast = [size * dtype.itemsize // 4 for name, size in sizes.items() if name not in tied]
        held_new, shard = 0, 0
        for size in cast:  # the writer's rule: a shard is written when the next tensor would overflow it
            held_new = max(held_new, shard + size)
            shard = size if shard and shard + size > shard_bytes else shard + size
        figures = {"old": {"peak_extra_rss_mb": old_peak, "tensors_held_mb": held_old / MB,
                           "written_mb": _folder_mb(out / "old"), "files": _files(out / "old")},
                   "new": {"peak_extra_rss_mb": new, "tensors_held_mb": held_new / MB,
                           "written_mb": _folder_mb(out / "new"), "files": _files(out / "new")}}
        if args.json:
            write_json({"model": args.model, "dtype": args.dtype, "shard_mb": args.shard_mb, **figures}, args.json)
        print(f"model {args.model}: {held_old / MB:.1f} MB in fp32, export dtype {args.dtype}, shard limit "
              f"{args.shard_mb:g} MB")
        print(f"old: rank 0 peak extra RSS {old_peak:.1f} MB, tensors held {held_old / MB:.1f} MB, "
              f"written {_folder_mb(out / 'old'):.1f} MB")
        print(f"new: rank 0 peak extra RSS {new:.1f} MB, tensors held {held_new / MB:.1f} MB, "
              f"written {_folder_mb(out / 'new'):.1f} MB in {_files(out / 'new')} file(s)")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shard-mb", type=float, default=5000.0)
    parser.add_argument("--json", default=None, help="also write the figures as JSON to this path ('-': stdout)")
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(minutes=5))
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(args, Rendezvous("127.0.0.1", port, "export"), out), nprocs=2, join=True)
    del store


if __name__ == "__main__":
    main()
