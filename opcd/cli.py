"""The `opcd` command.

    opcd distill [--cfg] [HYDRA_OVERRIDE ...]   on-policy context distillation (default: the CPU demo)
    opcd extract [--cfg] [HYDRA_OVERRIDE ...]   experiential knowledge extraction + best selection
    opcd evaluate RUN_DIR [KEY=VALUE ...]       every checkpoint + baselines, mean of the best 3
    opcd offpolicy generate|train [--cfg] [...]  the off-policy baseline: teacher data, then student training
    opcd oel [--cfg] [HYDRA_OVERRIDE ...]       online experiential learning rounds (text games)
    opcd report RUN_DIR [RUN_DIR ...] [--out D] plots and a Markdown/HTML summary of one or more runs

Overrides use Hydra syntax: `task=medmcqa`, `trainer.lr=5e-6`, `model.path=Qwen/Qwen3-8B`. Every
user error ends with one line on stderr and exit code 2; `--cfg` prints the resolved config and exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from opcd.errors import OpcdError
from opcd.interrupt import Terminated, handle_sigterm


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opcd", description="On-Policy Context Distillation of language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    distill = sub.add_parser("distill", help="train a student to behave without the context as the teacher does "
                                             "with it (default: a CPU demo on SmolLM2-135M)")
    distill.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    distill.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. task=medmcqa trainer.lr=5e-6")
    extract = sub.add_parser("extract", help="write experiential knowledge from solved problems over a stream "
                                             "and seeds, then pick the best by held-out score")
    extract.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    extract.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. task=math extract.seeds=[0,1]")
    evaluate = sub.add_parser("evaluate", help="evaluate every checkpoint of a run (and the baselines) without "
                                               "the context; mean of the best 3")
    evaluate.add_argument("run_dir", help="a run folder written by opcd distill")
    evaluate.add_argument("overrides", nargs="*", help="key=value changes to the run's config, e.g. evaluate.limit=100")
    offpolicy = sub.add_parser("offpolicy", help="the off-policy baseline: the teacher with the context writes "
                                                 "responses and top-k log-probs (generate), the student learns "
                                                 "from them (train)")
    offpolicy.add_argument("stage", choices=["generate", "train"])
    offpolicy.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    offpolicy.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. offpolicy.save_dir=DIR")
    report = sub.add_parser("report", help="PNG plots and a Markdown + HTML summary of runs (side by side)")
    report.add_argument("run_dirs", nargs="+", help="run folders (opcd distill / offpolicy train / evaluate)")
    report.add_argument("--out", help="output folder (default: <first run>/report)")
    oel = sub.add_parser("oel", help="online experiential learning: rounds of extract -> play without "
                                     "experience -> consolidate on the visited states")
    oel.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    oel.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. oel.rounds=3 game.name=Sokoban-v0")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
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


def _stop_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _run(args) -> int:
    from opcd.config import load_config, to_yaml

    if args.command == "evaluate":
        from opcd.pipelines.evaluate import load_run_config, run_evaluate

        summary = run_evaluate(args.run_dir, load_run_config(args.run_dir, args.overrides))
        print(json.dumps(summary, indent=1))
        return 0
    if args.command == "report":
        from opcd.report import write_report

        print(json.dumps(write_report(args.run_dirs, args.out), indent=1))
        return 0
    cfg = load_config(args.overrides)
    if args.cfg:
        print(to_yaml(cfg))
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
        print(f"run folder: {summary['run_dir']}  last checkpoint: {summary['checkpoint']}")
        return 0
    if args.command == "oel":
        from opcd.pipelines.oel import run_oel

        print(json.dumps(run_oel(cfg), indent=1))
        return 0
    if args.command == "distill":
        from opcd.pipelines.distill import run_distill

        summary = run_distill(cfg)
        print(json.dumps(summary["eval"], indent=1))
        print(f"run folder: {summary['run_dir']}  last checkpoint: {summary['checkpoint']}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
