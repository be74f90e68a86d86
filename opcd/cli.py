"""The `opcd` command.

    opcd distill [--cfg] [HYDRA_OVERRIDE ...]   on-policy context distillation (default: the CPU demo)
    opcd distill --plan [--gpu-memory 80GiB] [...]  the per-GPU memory plan of the resolved config
    opcd extract [--cfg] [HYDRA_OVERRIDE ...]   experiential knowledge extraction + best selection
    opcd evaluate [--cfg] RUN_DIR [KEY=VALUE ...]  every checkpoint + baselines, mean of the best 3
    opcd evaluate [--cfg] --base [OVERRIDE ...]    a base model alone, without (and with) the context
    opcd offpolicy generate|train [--cfg] [...]  the off-policy baseline: teacher data, then student training
    opcd oel [--cfg] [HYDRA_OVERRIDE ...]       online experiential learning rounds (text games)
    opcd report RUN_DIR [RUN_DIR ...] [--out D] plots and a Markdown/HTML summary of one or more runs
    opcd export RUN_DIR STEP|best               a Hugging Face folder of a (sharded) checkpoint

Overrides use Hydra syntax: `task=medmcqa`, `trainer.lr=5e-6`, `model.path=Qwen/Qwen3-8B`. Every
user error ends with one line on stderr and exit code 2; `--cfg` prints the resolved config and exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from opcd.errors import ConfigError, OpcdError
from opcd.runtime.interrupt import Terminated, handle_sigterm
from opcd.runtime.quiet import no_colour_reset_at_exit, quiet_third_party_logs


# The keys most runs touch, shown by `opcd distill --help` (tests/test_cli.py checks they exist).
MAIN_KEYS = [
    ("model.path, model.teacher_path", "hub id, local folder, or smollm2-135m-instruct"),
    ("task.train_data, task.test_data", "bundled:<name>, .jsonl/.parquet, hf:<id>, rg:<generator>"),
    ("task.context_path, task.language", "the teacher's context; task=language's target (fr, es...)"),
    ("rollout.n, rollout.temperature, rollout.max_response_length, rollout.backend", ""),
    ("loss.kl_topk, loss.support_mode", "support size (<= 0: whole vocabulary); tail|renorm|partial"),
    ("trainer.total_training_steps, trainer.batch_size, trainer.lr, trainer.save_freq", ""),
    ("trainer.exp_name, trainer.runs_dir", "the run folder is runs_dir/exp_name"),
    ("ray.address, ray.gpus_per_node, ray.ranks_per_group", "cluster, GPUs, FSDP2 ranks"),
]


def _overrides_epilog() -> str:
    """Presets, main keys and where to see the rest: the help text of every Hydra-configured command."""
    from dataclasses import fields

    from opcd.config import CONF_DIR, DistillConfig
    from opcd.config.hints import group_options

    presets = "  ".join(f"{group}={'|'.join(names)}" for group, names in group_options(CONF_DIR).items())
    lines = ["overrides are Hydra's KEY=VALUE (a misspelt key names the nearest one)",
             f"presets: {presets}", "main keys:"]
    lines += [f"  {keys}" + (f": {meaning}" if meaning else "") for keys, meaning in MAIN_KEYS]
    lines += [f"sections: {', '.join(f.name for f in fields(DistillConfig))}",
              "every key and its value: add --cfg (prints the resolved config and exits); "
              "meanings: opcd/config/schema.py"]
    return "\n".join(lines)


def _add_overrides(parser: argparse.ArgumentParser, example: str) -> None:
    # default=[]: without it argparse calls an empty nargs="*" positional "required" in its usage errors
    parser.add_argument("overrides", nargs="*", default=[], metavar="OVERRIDE", help=f"Hydra overrides, e.g. {example}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opcd", description="On-Policy Context Distillation of language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    hydra_help = dict(epilog=_overrides_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    distill = sub.add_parser("distill", help="train a student to behave without the context as the teacher does "
                                             "with it (default: a CPU demo on SmolLM2-135M)", **hydra_help)
    distill.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    distill.add_argument("--plan", action="store_true", help="print the per-GPU memory plan of the resolved config "
                         "and exit (loads no model; refuses when a phase exceeds the card)")
    distill.add_argument("--gpu-memory", default=None, metavar="SIZE",
                         help="the card for --plan, e.g. 80GiB or 141GiB (default: this machine's GPU, else 80GiB)")
    _add_overrides(distill, "task=medmcqa trainer.lr=5e-6")
    extract = sub.add_parser("extract", help="write experiential knowledge from solved problems over a stream "
                                             "and seeds, then pick the best by held-out score", **hydra_help)
    extract.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    _add_overrides(extract, "task=math extract.seeds=[0,1]")
    evaluate = sub.add_parser("evaluate", help="evaluate every checkpoint of a run (and the baselines) without "
                                               "the context; mean of the best 3")
    evaluate.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    evaluate.add_argument("--base", action="store_true", help="evaluate the base model model.path alone: no run "
                          "folder; the arguments are Hydra overrides as for distill (results in runs/<exp_name>)")
    evaluate.add_argument("arguments", nargs="*", default=[], metavar="RUN_DIR [KEY=VALUE ...]",
                          help="a run folder written by opcd distill, then key=value changes to its config, "
                               "e.g. evaluate.limit=100")
    offpolicy = sub.add_parser("offpolicy", help="the off-policy baseline: the teacher with the context writes "
                                                 "responses and top-k log-probs (generate), the student learns "
                                                 "from them (train)", **hydra_help)
    offpolicy.add_argument("stage", choices=["generate", "train"])
    offpolicy.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    _add_overrides(offpolicy, "offpolicy.save_dir=DIR")
    report = sub.add_parser("report", help="PNG plots and a Markdown + HTML summary of runs (side by side)")
    report.add_argument("run_dirs", nargs="+", help="run folders (opcd distill / offpolicy train / evaluate)")
    report.add_argument("--out", help="output folder (default: <first run>/report)")
    oel = sub.add_parser("oel", help="online experiential learning: rounds of extract -> play without "
                                     "experience -> consolidate on the visited states", **hydra_help)
    oel.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    _add_overrides(oel, "oel.rounds=3 game.name=Sokoban-v0")
    export = sub.add_parser("export", help="write the Hugging Face folder (transformers, vLLM) of a checkpoint "
                                           "saved by several ranks into global_step_<STEP>/model")
    export.add_argument("run_dir", help="a run folder written by opcd distill")
    export.add_argument("step", help="the checkpoint's step, or `best`: the highest held-out score "
                        "(opcd evaluate's results, else opcd distill's evaluations during and after training)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    bad = _undecodable(argv)
    if bad is not None:  # before argparse, Hydra or Ray see it: they trace back (UnicodeEncodeError) later
        print(f"opcd: error: argument {bad}: not UTF-8 text (expected UTF-8 arguments)", file=sys.stderr)
        return 2
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    quiet_third_party_logs()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    handle_sigterm()
    try:
        return _run(args)
    except OpcdError as exc:
        _stop_ray()  # Ray's own shutdown chatter must not follow our one-line error
        print(f"opcd: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder or file of the user's (a full disk, no permission): name it, no traceback
        if exc.filename is None:
            raise
        _stop_ray()
        print(f"opcd: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if isinstance(exc, Terminated):
            _stop_ray()  # before exit: Ray's atexit clean-up after a signal is where its C++ side aborted
        why = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"opcd: {why} (the last complete checkpoint is kept; run the same command to resume)",
              file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        no_colour_reset_at_exit()  # imported libraries are loaded by now


def _undecodable(argv: list[str]) -> str | None:
    """The first argument holding bytes that are not UTF-8 (Python keeps them as lone surrogates), shown
    with those bytes escaped; None when all are text."""
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return ascii(arg.encode("utf-8", "surrogateescape"))[1:]
    return None


def _print_run_end(summary: dict) -> None:
    print(f"run folder: {summary['run_dir']}  last checkpoint: {summary['checkpoint']}")
    if summary.get("report"):
        print(f"report: {summary['report']}/report.html (also report.md and PNG plots; "
              f"`opcd report RUN_DIR ...` compares runs)")


def _stop_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _run(args) -> int:
    from opcd.config import load_config, to_yaml

    if args.command == "evaluate":
        from opcd.pipelines.evaluate import load_run_config, run_evaluate

        if args.base:
            cfg = load_config(args.arguments)
            run_dir = cfg.run_dir
        elif args.arguments:
            run_dir, overrides = args.arguments[0], args.arguments[1:]
            cfg = load_run_config(run_dir, overrides)
        else:
            raise ConfigError("opcd evaluate needs a run folder (RUN_DIR [KEY=VALUE ...]) or --base [OVERRIDE ...]")
        if args.cfg:
            print(to_yaml(cfg))
            return 0
        print(json.dumps(run_evaluate(run_dir, cfg, base_only=args.base), indent=1))
        return 0
    if args.command == "export":
        from opcd.runs.export import best_step, export_checkpoint

        if args.step != "best" and not args.step.isdigit():
            raise ConfigError(f"opcd export: step {args.step!r}: expected a step number or best")
        step = best_step(args.run_dir) if args.step == "best" else int(args.step)
        print(export_checkpoint(args.run_dir, step))
        return 0
    if args.command == "report":
        from opcd.runs.report import write_report

        print(json.dumps(write_report(args.run_dirs, args.out), indent=1))
        return 0
    cfg = load_config(args.overrides)
    if args.command == "extract":
        from opcd.pipelines.extract import extract_defaults

        cfg = extract_defaults(cfg, args.overrides)
    if getattr(args, "plan", False):
        from opcd.runtime.plan_cli import print_plan

        print(print_plan(cfg, args.gpu_memory))
        return 0
    if args.cfg:
        print(to_yaml(cfg))
        if args.command == "distill":
            from opcd.runtime.plan_cli import plan_comment

            print(plan_comment(cfg, args.gpu_memory))  # comments: the output stays the YAML of the config
        return 0
    if args.command == "extract":
        from opcd.pipelines.extract import run_extract

        summary = run_extract(cfg)
        print(json.dumps(summary, indent=1))
        return 0
    if args.command == "offpolicy":
        from opcd.pipelines.offpolicy import run_offpolicy_generate, run_offpolicy_train

        if args.stage == "generate":
            print(json.dumps(run_offpolicy_generate(cfg), indent=1))
            return 0
        summary = run_offpolicy_train(cfg)
        print(json.dumps(summary["eval"], indent=1))
        _print_run_end(summary)
        return 0
    if args.command == "oel":
        from opcd.pipelines.oel import run_oel

        print(json.dumps(run_oel(cfg), indent=1))
        return 0
    if args.command == "distill":
        from opcd.pipelines.distill import run_distill

        summary = run_distill(cfg)
        print(json.dumps(summary["eval"], indent=1))
        _print_run_end(summary)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
