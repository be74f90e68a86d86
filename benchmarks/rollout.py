"""Benchmark: the `hf` rollout engine's KV cache paths, and what its first call costs (the warm-up).

Variants (opcd/rollout/hf.py, `rollout.hf_cache` / `rollout.hf_compile`), each on the same prompts:
  dynamic           transformers' growing cache, eager (today's path; the CPU default)
  static            preallocated cache, eager
  static+compile    preallocated cache, decoding step under torch.compile(mode="reduce-overhead"): CUDA graphs
                    on a GPU (the GPU default)
The model is loaded as the student worker holds it: fp32 weights, and on CUDA generation under bf16 autocast.
`--batch` chat prompts, `--new-tokens` sampled tokens each at temperature 1.0 with EOS ignored, top-`--topk`
recorded. Per variant: the first call (warm-up), the median of `--repeats` later calls, tokens/s, and for the
compiled variant the seconds torch.compile itself reports (dynamo + inductor), so the warm-up splits into
compilation and the rest (CUDA graph capture, cache allocation, first kernel launches). A last call with
`--batch - 1` prompts (padded back to a compiled shape) shows what a new batch size costs. Greedy agreement:
the share of greedy tokens equal to the dynamic path's before their first divergence (1.0 = identical).

Run:  python benchmarks/rollout.py --device cuda --model DIR --batch 64 --new-tokens 256   # issue 14 workload
      .venv/bin/python benchmarks/rollout.py --model DIR --batch 4 --new-tokens 8 --variants dynamic,static
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time

import torch
from json_out import write_json  # benchmarks/: the script's own folder

VARIANTS = {"dynamic": ("dynamic", False), "static": ("static", False), "static+compile": ("static", True)}
QUESTIONS = ["Why is the sky blue?", "How do bees make honey?", "What is a prime number?", "Why do cats purr?",
             "How does a rainbow form?", "What causes tides?", "Why do leaves change colour?", "What is gravity?"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="opcd model name or local HF folder")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8, help="prompts per call")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per prompt (EOS ignored)")
    parser.add_argument("--topk", type=int, default=64, help="top-k ids recorded per position")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
    parser.add_argument("--variants", help=f"comma-separated of {','.join(VARIANTS)} (default: dynamic,static+compile "
                                           "on cuda; dynamic,static on cpu, where compiling takes minutes)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH ('-': stdout)")
    args = parser.parse_args(argv)
    args.variants = (args.variants or ("dynamic,static+compile" if args.device == "cuda" else "dynamic,static")).split(",")
    if set(args.variants) - set(VARIANTS):
        parser.error(f"--variants {','.join(args.variants)}: expected names from {','.join(VARIANTS)}")
    if args.batch < 2:
        parser.error("--batch must be >= 2 (a call with --batch - 1 prompts is measured too)")
    return args


def _timed(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def _compile_seconds() -> float:
    from torch._dynamo.utils import compilation_time_metrics

    return sum(compilation_time_metrics.get("_compile.compile_inner", []))


def measure(args, model, tokenizer, prompts, variant: str, greedy_reference) -> tuple[dict, torch.Tensor]:
    from opcd.protocol import SamplingParams
    from opcd.rollout.hf import HFRollout

    cache, compile = VARIANTS[variant]
    autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16) if args.device == "cuda" \
        else contextlib.nullcontext
    rollout = HFRollout(model, tokenizer, batch_size=args.batch, autocast=autocast, cache=cache, compile=compile)
    rollout.eos_ids = {-1}  # never stop early: every row makes exactly --new-tokens tokens
    sampled = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, record_topk=args.topk)
    compiled_before = _compile_seconds()
    first, _ = _timed(lambda: rollout.generate(prompts, sampled, 0))
    compile_first = _compile_seconds() - compiled_before
    later = [_timed(lambda: rollout.generate(prompts, sampled, 1 + i))[0] for i in range(args.repeats)]
    smaller, _ = _timed(lambda: rollout.generate(prompts[:-1], sampled, 9))
    _, greedy = _timed(lambda: rollout.generate(prompts, SamplingParams(temperature=0, max_new_tokens=args.new_tokens,
                                                                        record_topk=args.topk), 0))
    median = statistics.median(later)
    row = {"variant": variant, "first_call_s": first, "compile_s_in_first_call": compile_first,
           "median_s": median, "tokens_per_s": args.batch * args.new_tokens / median,
           "smaller_batch_first_call_s": smaller, "calls_s": later}
    if greedy_reference is not None:
        row["greedy_agreement"] = _agreement(greedy_reference, greedy.response_ids)
    return row, greedy.response_ids


def _agreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Share of tokens before each row's first divergence (bf16 kernels may flip a near-tie)."""
    width = min(reference.shape[1], other.shape[1])
    same = (reference[:, :width] == other[:, :width]).long().cumprod(dim=1)
    return float(same.sum()) / reference.numel()


def main(argv=None) -> dict:
    args = parse_args(argv)
    from opcd.models import load_causal_lm, load_tokenizer, resolve_model

    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                             add_generation_prompt=True, tokenize=True, return_dict=False)
               for i in range(args.batch)]
    load_s, model = _timed(lambda: load_causal_lm(path, "float32").to(args.device).eval())
    print(f"device={args.device} batch={args.batch} new_tokens={args.new_tokens} topk={args.topk} "
          f"model load {load_s:.1f}s torch={torch.__version__}", flush=True)
    rows, reference = [], None
    for variant in args.variants:
        row, greedy = measure(args, model, tokenizer, prompts, variant, reference)
        reference = greedy if reference is None else reference
        rows.append(row)
        print(f"{variant:>15}: first call {row['first_call_s']:7.2f}s (compile {row['compile_s_in_first_call']:.1f}s)"
              f"  then {row['median_s']:6.2f}s/call = {row['tokens_per_s']:9.1f} tokens/s"
              f"  batch-1 first call {row['smaller_batch_first_call_s']:.2f}s"
              + (f"  greedy agreement {row['greedy_agreement']:.3f}" if "greedy_agreement" in row else ""), flush=True)
    speedup = rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(f"{rows[-1]['variant']} / {rows[0]['variant']}: {speedup:.2f}x tokens/s")
    result = {"config": vars(args), "torch": torch.__version__, "model_load_s": load_s, "variants": rows,
              "speedup_last_over_first": speedup,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    if args.json:
        write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
