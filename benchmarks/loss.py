"""Benchmark: memory and time of the support reverse KL, full logits vs the chunked lm_head path.

Both variants compute the same loss for N tokens, hidden size H, vocabulary V and a support of K ids
per token (`partial` reverse KL, token mean) and run its backward:

  naive    logits = hidden @ W.T for student and teacher, log_softmax over [N, V], gather the K ids,
           support_reverse_kl, backward. Keeps [N, V] float32 tensors alive for backward.
  chunked  teacher via chunked.support_logprobs_no_grad, student via chunked.support_logprobs_from_hidden
           (`--chunk-size` tokens per lm_head chunk, checkpointed), support_reverse_kl, backward.
           Also computes both per-token entropies (the workers report them); naive does not.
  fused    what the student worker runs: teacher as in chunked, student loss and its gradient in one
           chunked pass (chunked.fused_support_loss): no recomputation in the backward.

Each (vocab, variant) runs in a fresh subprocess of this script (`--variant`), so peak memory is not
polluted by the other variant: on CPU the peak resident set size (ru_maxrss) after the runs minus
before the first one; on CUDA torch.cuda.max_memory_allocated minus the memory allocated before.
Time is the median over `--repeats` runs. The parent also reports the largest absolute difference
between the two variants' loss values and gradients w.r.t. the student hidden states.

Run:  .venv/bin/python benchmarks/loss.py            # N=4096, H=576, V in {49152, 151936}, K=256
      .venv/bin/python benchmarks/loss.py --quick    # N=1024, one repeat (~1.5 min on 2 CPU cores)
      .venv/bin/python benchmarks/loss.py --json results.json
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from json_out import write_json  # benchmarks/: the script's own folder

from opcd.loss import chunked, kl

VARIANTS = ("naive", "chunked", "fused")
OURS = ("chunked", "fused")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="N: tokens in the batch (default 4096)")
    parser.add_argument("--hidden", type=int, default=576, help="H: hidden size (576 = SmolLM2-135M)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936],
                        help="V: vocabulary sizes to run (SmolLM2 and Qwen defaults)")
    parser.add_argument("--k", type=int, default=256, help="K: support ids per token")
    parser.add_argument("--chunk-size", type=int, default=512, help="tokens per lm_head chunk (chunked and fused)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per variant, the median is reported (default: 3 on CUDA, 1 on CPU, "
                             "where one run of the default sizes already takes ~3 minutes on 2 cores)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--quick", action="store_true", help="N=1024 and one repeat: a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-': stdout)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process: run one variant
    parser.add_argument("--out", help=argparse.SUPPRESS)  # child process: where to write its result
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.device == "cuda" else 1
    if args.quick:
        args.tokens, args.repeats = 1024, 1
    return args


# -- one variant (child process) ---------------------------------------------------------------------

def make_inputs(n: int, h: int, v: int, k: int, seed: int, device: str) -> dict[str, torch.Tensor]:
    """Student/teacher hidden states [N, H] and lm_head weights [V, H] (teacher = student + noise, so the
    KL is far from 0; logits have a std of ~3, i.e. peaked but not one-hot) and support ids [N, K]."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (3.0 / h ** 0.5)
    inputs = {"hidden": hidden, "weight": weight,
              "teacher_hidden": hidden + 0.5 * torch.randn(n, h, generator=gen),
              "teacher_weight": weight + 0.5 * torch.randn(v, h, generator=gen) / h ** 0.5,
              "ids": torch.randint(0, v, (n, k), generator=gen)}
    return {name: t.to(device) for name, t in inputs.items()}


def naive_step(x: dict[str, torch.Tensor], chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        teacher = torch.log_softmax(x["teacher_hidden"] @ x["teacher_weight"].T, dim=-1).gather(-1, x["ids"])
    student = torch.log_softmax(x["hidden"] @ x["weight"].T, dim=-1).gather(-1, x["ids"])  # [N, V] kept
    return kl.support_reverse_kl(student, teacher, "partial").mean(), teacher


def chunked_step(x: dict[str, torch.Tensor], chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    teacher, _, _ = chunked.support_logprobs_no_grad(x["teacher_hidden"], x["teacher_weight"], x["ids"],
                                                  chunk_size=chunk_size)
    student, _ = chunked.support_logprobs_from_hidden(x["hidden"], x["weight"], x["ids"], chunk_size=chunk_size)
    return kl.support_reverse_kl(student, teacher, "partial").mean(), teacher


def fused_step(x: dict[str, torch.Tensor], chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    teacher, _, _ = chunked.support_logprobs_no_grad(x["teacher_hidden"], x["teacher_weight"], x["ids"],
                                                          chunk_size=chunk_size)
    n = x["hidden"].shape[0]
    value, _, _ = chunked.fused_support_loss(
        x["hidden"], x["weight"], x["ids"], teacher, lambda s, t, m: kl.support_reverse_kl(s, t, "partial", m),
        torch.full((n,), 1.0 / n, device=x["hidden"].device), chunk_size=chunk_size)
    return value, teacher


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_variant(args: argparse.Namespace, vocab: int) -> dict:
    """Run one variant `repeats` times; -> peak memory (MiB), times (s), loss, and the hidden gradient."""
    step = {"naive": naive_step, "chunked": chunked_step, "fused": fused_step}[args.variant]
    x = make_inputs(args.tokens, args.hidden, vocab, args.k, args.seed, args.device)
    x["hidden"].requires_grad_()
    x["weight"].requires_grad_()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    times = []
    for _ in range(args.repeats):
        x["hidden"].grad = x["weight"].grad = None
        _sync(args.device)
        start = time.perf_counter()
        value, _ = step(x, args.chunk_size)
        value.backward()
        _sync(args.device)
        times.append(time.perf_counter() - start)
    if args.device == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**10
    return {"peak_mib": peak_mib, "times_s": times, "loss": value.item(), "grad_hidden": x["hidden"].grad.cpu()}


# -- driver (parent process) --------------------------------------------------------------------------

def spawn(args: argparse.Namespace, variant: str, vocab: int, out: Path) -> dict:
    """Run one variant in a fresh interpreter (so the peak RSS is its own) and load its result."""
    cmd = [sys.executable, __file__, "--variant", variant, "--out", str(out), "--vocab", str(vocab),
           "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--k", str(args.k),
           "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--device", args.device, "--seed", str(args.seed)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, env=env)
    return torch.load(out, weights_only=True)


def compare(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in args.vocab:
            result = {v: spawn(args, v, vocab, Path(tmp) / f"{v}-{vocab}.pt") for v in VARIANTS}
            naive = result["naive"]
            row = {"vocab": vocab, "tokens": args.tokens, "hidden": args.hidden, "k": args.k,
                   "chunk_size": args.chunk_size, "device": args.device, "repeats": args.repeats}
            for name, res in result.items():
                row[name] = {"peak_mib": res["peak_mib"], "median_s": statistics.median(res["times_s"]),
                             "times_s": res["times_s"], "loss": res["loss"]}
            for name in OURS:
                ours = result[name]
                row[name].update(
                    memory_ratio=ours["peak_mib"] / max(naive["peak_mib"], 1e-9),
                    time_ratio=row[name]["median_s"] / row["naive"]["median_s"],
                    max_abs_diff_loss=abs(naive["loss"] - ours["loss"]),
                    max_abs_diff_grad_hidden=(naive["grad_hidden"] - ours["grad_hidden"]).abs().max().item())
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'vocab':>7} {'variant':>8} {'peak MiB':>9} {'median s':>9} {'loss':>10} | "
            f"{'mem ours/naive':>14} {'time ours/naive':>15} {'max|dloss|':>10} {'max|dgrad_h|':>12}")
    print(head)
    print("-" * len(head))
    for row in rows:
        for name in VARIANTS:
            res = row[name]
            line = f"{row['vocab']:>7} {name:>8} {res['peak_mib']:>9.0f} {res['median_s']:>9.2f} {res['loss']:>10.6f} |"
            if name in OURS:
                line += (f" {res['memory_ratio']:>14.3f} {res['time_ratio']:>15.3f} "
                         f"{res['max_abs_diff_loss']:>10.2e} {res['max_abs_diff_grad_hidden']:>12.2e}")
            print(line)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.variant:  # child
        (vocab,) = args.vocab
        torch.save(run_variant(args, vocab), args.out)
        return
    print(f"N={args.tokens} H={args.hidden} K={args.k} chunk={args.chunk_size} device={args.device} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}", flush=True)
    rows = compare(args)
    print_table(rows)
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    main()
