"""One check of opcd on a GPU machine, from the offline pack: the rollout and step benchmarks, `opcd distill`
3 steps and a resume, the loss benchmark, the tests with CUDA visible (in that order); ONE summary, gpu_check.json + gpu_check.md (and the
stages' output in gpu_check.log), in --out (default: $OUT when set, else ./gpu_check).

Every stage runs in a subprocess under a time limit cut to what is left of --budget-s (default 450 s, so
the whole check ends inside 8 minutes); a stage that fails or times out is recorded and the next one runs;
a stage with no time left is recorded as skipped. The model is a random one of SmolLM2-1.7B's shape built by
the pack's make_model.py (`--model-size`), or --model DIR.

On the GPU machine (device tool), from the project root with the pack in .gpu/:
    bash .gpu/unpack.sh && source /tmp/opcd-gpu/env.sh && cd /tmp/opcd-gpu/opcd && python3 tools/gpu_check.py
CPU smoke run of the same stages with a tiny model and small workloads (a few minutes here):
    .venv/bin/python tools/gpu_check.py --cpu --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATUSES = ("passed", "failed", "timeout", "skipped")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check",
                        help="folder for gpu_check.json/.md/.log (default: $OUT, else ./gpu_check)")
    parser.add_argument("--cpu", action="store_true", help="smoke mode: tiny model, tiny workloads, no GPU needed")
    parser.add_argument("--budget-s", type=float, default=450.0, help="seconds for all stages together")
    parser.add_argument("--model", help="a local HF model folder (default: build one with make_model.py)")
    parser.add_argument("--model-size", default=None, choices=["tiny", "360m", "1.7b"],
                        help="make_model.py size (default: 1.7b, tiny with --cpu)")
    parser.add_argument("--make-model", help="path of make_model.py (default: found next to the pack or in ../shared)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    args = parser.parse_args(argv)
    args.model_size = args.model_size or ("tiny" if args.cpu else "1.7b")
    args.stages = [s for s in args.stages.split(",") if s]
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        parser.error(f"--stages: unknown {','.join(sorted(unknown))} (known: {','.join(STAGES)})")
    if args.budget_s <= 0:
        parser.error(f"--budget-s {args.budget_s}: expected seconds > 0")
    return args


@dataclass
class StageResult:
    name: str
    status: str  # one of STATUSES
    seconds: float = 0.0
    commands: list[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)  # what the stage measured (parsed from its JSON or metrics)
    tail: str = ""  # the end of its output when it did not pass


class Budget:
    def __init__(self, seconds: float, cap_scale: float = 1.0):
        self.deadline = time.monotonic() + seconds
        self.cap_scale = cap_scale  # stage caps are sized for the GPU; the CPU smoke run stretches them

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_command(command: list[str], timeout: float, log, env: dict | None = None) -> tuple[str, str]:
    """Run one command under `timeout` seconds -> (status, last 3000 characters of its output)."""
    log.write(f"\n$ {' '.join(command)}\n")
    log.flush()
    if timeout <= 1:
        return "skipped", "no time left in --budget-s"
    try:
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        output, status = done.stdout, "passed" if done.returncode == 0 else "failed"
    except subprocess.TimeoutExpired as exc:
        output, status = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) \
            else (exc.stdout or ""), "timeout"
    log.write(output)
    log.write(f"[{status}]\n")
    log.flush()
    return status, output[-3000:]


def stage(name: str, commands: list[list[str]], cap: float, budget: Budget, log, figures=None, env=None) -> StageResult:
    """Run `commands` in order (stop at the first that does not pass) within min(cap, budget left)."""
    start = time.monotonic()
    result = StageResult(name, "passed", commands=[" ".join(c) for c in commands])
    limit = min(cap * budget.cap_scale, budget.left())
    for command in commands:
        status, tail = run_command(command, limit - (time.monotonic() - start), log, env)
        if status != "passed":
            result.status, result.tail = status, tail
            break
    result.seconds = time.monotonic() - start
    if result.status == "passed" and figures is not None:
        try:
            result.figures = figures()
        except Exception as exc:  # noqa: BLE001 - a figure we cannot read is reported, not fatal
            result.status, result.tail = "failed", f"could not read the stage's figures: {exc!r}"
    return result


# -- the stages -----------------------------------------------------------------------------------------

def environment() -> dict:
    import torch
    import transformers

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), gpu_memory_gb=torch.cuda.get_device_properties(0).total_memory / 2**30)
    for name in ("ray", "hydra", "trl"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def find_make_model(explicit: str | None) -> Path:
    from opcd.models import cache_dir

    candidates = [Path(explicit)] if explicit else [cache_dir().parent / "make_model.py", ROOT / ".gpu" / "make_model.py",
                                                      ROOT.parent / "shared" / "gpu" / "make_model.py"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"make_model.py not found (tried {', '.join(map(str, candidates))}); pass --make-model")


def model_stage(args, work: Path, budget: Budget, log) -> tuple[StageResult, str | None]:
    if args.model:
        return StageResult("model", "passed", figures={"path": args.model}), args.model
    from opcd.models import ensure_builtin_smollm2

    out = work / f"model-{args.model_size}"
    try:
        command = [sys.executable, str(find_make_model(args.make_model)), str(ensure_builtin_smollm2()), str(out),
                   args.model_size]
    except Exception as exc:  # noqa: BLE001
        return StageResult("model", "failed", tail=str(exc)), None
    result = stage("model", [command], 120, budget, log, lambda: {"path": str(out), "size": args.model_size})
    return result, str(out) if result.status == "passed" else None


def workloads(args) -> dict:
    """Per-stage sizes: the issue's GPU workload for the step benchmark, small ones on --cpu."""
    if args.cpu:
        return {"pytest": ["tests/rollout/test_hf_rollout.py", "-k", "unset_cache_options or compiled_batches"],
                "distill": ["trainer.batch_size=2", "trainer.micro_batch_size=2", "rollout.max_response_length=4",
                            "trainer.num_threads=1"],
                "rollout": ["--batch", "2", "--new-tokens", "4", "--repeats", "1", "--variants", "dynamic,static"],
                "step": ["--batch-size", "2", "--max-new-tokens", "4", "--steps", "2", "--threads", "1"],
                "loss": ["--tokens", "64", "--hidden", "64", "--vocab", "1024", "--k", "8", "--repeats", "1",
                         "--device", "cpu"]}
    return {"pytest": ["-m", "not slow", "tests"],
            "distill": ["trainer.batch_size=16", "rollout.max_response_length=64", "model.dtype=bfloat16",
                        "model.attn_implementation=sdpa", "ray.gpus_per_node=1"],
            "rollout": ["--device", "cuda", "--batch", "64", "--new-tokens", "256", "--repeats", "1"],
            "step": ["--device", "cuda", "--batch-size", "64", "--micro-batch-size", "32", "--max-new-tokens", "256",
                     "--steps", "3"],
            "loss": ["--device", "cuda", "--quick"]}


def pytest_stage(args, sizes, budget, log) -> StageResult:
    junit = Path(tempfile.mkdtemp()) / "junit.xml"

    def counts() -> dict:
        import xml.etree.ElementTree as ET

        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    result = stage("tests", [[sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                              *sizes["pytest"]]], 170, budget, log)
    if junit.exists():  # the counts are worth having when some tests failed too
        result.figures = counts()
    return result


def distill_stage(args, model: str, sizes, work: Path, budget, log) -> StageResult:
    """3 steps, then the same run to 4 steps: it must resume from the step-3 checkpoint."""
    runs = work / "runs"
    base = [sys.executable, "-m", "opcd.cli", "distill", f"model.path={model}", f"trainer.runs_dir={runs}",
            "trainer.exp_name=check", "trainer.eval_before=false", "trainer.eval_after=false", "trainer.save_freq=1",
            "trainer.loggers=[console,jsonl]", *sizes["distill"]]

    def figures() -> dict:
        lines = [json.loads(x) for x in (runs / "check" / "metrics.jsonl").read_text().splitlines()]
        steps = [m["step"] for m in lines]
        if steps != [1, 2, 3, 4]:
            raise ValueError(f"metrics.jsonl steps {steps}, expected [1, 2, 3, 4] (3 steps, then a resume to 4)")
        keep = ("timing/step", "timing/rollout", "timing/teacher", "timing/update", "loss/kl")
        return {"steps": [{k: v for k, v in m.items() if k in keep or "_gpu_" in k or k == "step"} for m in lines]}
    return stage("distill+resume", [[*base, "trainer.total_training_steps=3"],
                                    [*base, "trainer.total_training_steps=4"]], 200, budget, log, figures)


def benchmark_stage(name: str, script: str, extra: list[str], cap: float, work: Path, budget, log) -> StageResult:
    out = work / f"{name}.json"
    return stage(name, [[sys.executable, str(ROOT / "benchmarks" / script), *extra, "--json", str(out)]], cap, budget,
                 log, lambda: _without_records(json.loads(out.read_text())))


def _without_records(data):
    """Benchmark JSON minus per-step records (the summary keeps the figures)."""
    if isinstance(data, dict):
        return {k: _without_records(v) for k, v in data.items() if k != "records"}
    return data


# the benchmarks first: they answer issue 14's targets; whatever the budget leaves out is recorded as skipped
# and can be run in a second call (--stages distill,loss,tests)
STAGES = ("environment", "model", "rollout", "step", "distill", "loss", "tests")


def run_check(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget, started = Budget(args.budget_s, cap_scale=10 if args.cpu else 1), time.time()
    sizes = workloads(args)
    results: list[StageResult] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp, open(out / "gpu_check.log", "w") as log:
        work = Path(tmp)
        results.append(StageResult("environment", "passed", figures=environment()))
        model_result, model = model_stage(args, work, budget, log)
        results.append(model_result)
        for name in args.stages:
            if name in ("environment", "model"):
                continue
            if model is None and name != "tests":
                results.append(StageResult(name, "skipped", tail="no model"))
                continue
            match name:
                case "tests":
                    results.append(pytest_stage(args, sizes, budget, log))
                case "distill":
                    results.append(distill_stage(args, model, sizes, work, budget, log))
                case "rollout":
                    results.append(benchmark_stage("rollout", "rollout.py", ["--model", model, *sizes["rollout"]],
                                                   150, work, budget, log))
                case "step":
                    results.append(benchmark_stage("step", "step.py", ["--model", model, *sizes["step"]],
                                                   240, work, budget, log))
                case "loss":
                    results.append(benchmark_stage("loss", "loss.py", sizes["loss"], 60, work, budget, log))
    summary = {"mode": "cpu smoke" if args.cpu else "gpu", "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
               "seconds": time.time() - started, "budget_s": args.budget_s,
               "ok": all(r.status == "passed" for r in results), "stages": [asdict(r) for r in results]}
    write_summary(summary, out)
    return summary


def write_summary(summary: dict, out: Path) -> None:
    """gpu_check.json (everything) and gpu_check.md (a table of stages and their main figures)."""
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"# opcd GPU check ({summary['mode']})", "",
             f"started {summary['started_utc']} UTC, {summary['seconds']:.0f} s of a {summary['budget_s']:.0f} s budget, "
             f"**{'all stages passed' if summary['ok'] else 'NOT all stages passed'}**", "",
             "| stage | status | seconds | figures |", "|---|---|---|---|"]
    for s in summary["stages"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {_headline(s)} |")
    for s in summary["stages"]:
        if s["tail"]:
            lines += ["", f"## {s['name']}: {s['status']}", "", "```", s["tail"][-1500:], "```"]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def _headline(stage: dict) -> str:
    """The few numbers of a stage worth a glance (all of them are in the JSON)."""
    f = stage["figures"]
    match stage["name"]:
        case "environment":
            return ", ".join(f"{k} {f[k]}" for k in ("torch", "transformers", "gpu", "trl") if k in f)
        case "tests":
            return ", ".join(f"{k} {v}" for k, v in f.items())
        case "distill+resume" if f:
            return "; ".join(f"step {m['step']}: {m.get('timing/step', 0):.2f} s" for m in f["steps"])
        case "rollout" if f:
            return "; ".join(f"{v['variant']}: first {v['first_call_s']:.1f} s, then {v['tokens_per_s']:.0f} tok/s"
                             for v in f["variants"])
        case "step" if f:
            parts = [f"{n}: {f[n]['tokens_per_s']:.0f} tok/s, {f[n]['median_s_per_step']:.2f} s/step"
                     for n in ("opcd", "trl") if n in f]
            return "; ".join(parts + ([f"opcd/TRL {f['ratio_opcd_over_trl']:.2f}x"] if "ratio_opcd_over_trl" in f else []))
        case "loss" if f:
            return "; ".join(f"V={r['vocab']} fused vs naive: memory {r['fused']['memory_ratio']:.2f}x, "
                             f"time {r['fused']['time_ratio']:.2f}x" for r in f if "fused" in r)
    return ""


def main(argv=None) -> int:
    summary = run_check(parse_args(argv))
    print((Path(parse_args(argv).out) / "gpu_check.md").read_text())
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
