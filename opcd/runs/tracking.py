"""Experiment tracking: a console progress bar, `metrics.jsonl`, tensorboard and wandb behind one call.

The progress bar covers the training steps only: it appears when training starts (`start_progress`,
so the evaluation before training is not counted in its rate and ETA) and is closed after the last
step (`end_progress`), leaving its last line on screen once, before anything printed afterwards.

wandb follows WANDB_MODE when set; otherwise it runs online only when WANDB_API_KEY is in the
environment, offline otherwise (so it works with
no network); the key itself is never read into the config or written anywhere by opcd.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

from tqdm import tqdm

from opcd import metrics as M
from opcd.data.files import read_text

_BAR_KEYS = {M.LOSS_KL: "kl", M.ROLLOUT_SCORE: "score", M.PERF_TOKENS_PER_S: "tok/s",
             M.PERF_STUDENT_GPU_PEAK: "gpu_GB", M.PERF_STUDENT_GPU_RESERVED: "gpu_rsv_GB",
             M.PERF_GPU_USED_MAX: "gpu_used_GB"}


class Tracker:
    def __init__(self, loggers: list[str], run_dir: Path, *, exp_name: str, config: dict, total_steps: int,
                 start_step: int = 0, wandb_project: str | None = None):
        self.run_dir = Path(run_dir)
        self.bar = None
        self._bar_settings = dict(total=total_steps, initial=start_step, desc=exp_name, unit="step",
                                  dynamic_ncols=True, file=sys.stderr, mininterval=0) if "console" in loggers else None
        self.jsonl = None
        self.tensorboard = None
        self.wandb = None
        if "jsonl" in loggers:
            self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        if "wandb" in loggers:
            self.wandb = _init_wandb(dict(project=wandb_project or os.environ.get("WANDB_PROJECT", "opcd"),
                                          name=exp_name, dir=str(self.run_dir), config=config,
                                          resume="allow", id=_wandb_id(self.run_dir, exp_name)))

    def start_progress(self) -> None:
        """Show the progress bar from now on (its clock starts here)."""
        if self._bar_settings is not None and self.bar is None:
            self.bar = tqdm(**self._bar_settings)
            self._bar_settings = None  # one bar per run: after end_progress, messages print plainly

    def end_progress(self) -> None:
        """Close the bar after the last step; its last line stays on screen once."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.start_progress()  # a caller that did not start it: the bar starts with the first step logged
        clean = {k: float(v) for k, v in metrics.items()}
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **{k: _json_float(v) for k, v in clean.items()}}) + "\n")
            self.jsonl.flush()
        if self.tensorboard:
            for key, value in clean.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(clean, step=step)
        if self.bar:
            self.bar.set_postfix({short: f"{clean[key]:.4g}" for key, short in _BAR_KEYS.items() if key in clean},
                                 refresh=False)
            self.bar.n = step
            if step < self.bar.total:  # the last step's line is drawn once, by end_progress
                self.bar.refresh()

    def table(self, name: str, rows: list[dict]) -> None:
        """Per-item evaluation results as a wandb table (no-op for the other loggers: the run folder
        already holds them as eval_<who>.jsonl)."""
        if self.wandb and rows:
            import wandb

            columns = list(rows[0])
            data = [[value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
                     for value in (row.get(c) for c in columns)] for row in rows]
            self.wandb.log({name: wandb.Table(columns=columns, data=data)})

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)  # where tqdm.write puts it with a bar: stdout

    def summary(self, values: dict[str, float]) -> None:
        if self.wandb:
            self.wandb.summary.update(values)

    def close(self) -> None:
        self.end_progress()
        if self.jsonl:
            self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def _init_wandb(kwargs: dict):
    """wandb.init online when WANDB_API_KEY is set (WANDB_MODE decides when given), else offline. An online
    start that cannot reach the server (no network, a wrong WANDB_BASE_URL) falls back to offline with one
    warning after WANDB_INIT_TIMEOUT seconds (default 30), instead of minutes of retries and a CommError:
    the run's metrics then sync later with `wandb sync <run folder>/wandb/offline-run-*`."""
    import logging

    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    if mode != "online":
        return wandb.init(mode=mode, **kwargs)
    timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", "30"))
    try:
        return wandb.init(mode="online", settings=wandb.Settings(init_timeout=timeout, silent=True), **kwargs)
    except wandb.errors.Error as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        logging.getLogger("opcd").warning("wandb: cannot reach %s within %g s (%s); logging offline instead "
                                          "(sync later with `wandb sync`)", os.environ.get("WANDB_BASE_URL",
                                                                                          "the wandb server"),
                                          timeout, first[:200])
        wandb.teardown()  # the failed start still holds the run id in wandb's service process
        return wandb.init(mode="offline", **kwargs)


def _json_float(value: float):
    return value if math.isfinite(value) else str(value)


def _wandb_id(run_dir: Path, exp_name: str) -> str:
    """A stable run id per run folder, so a resumed run continues the same wandb run."""
    id_file = run_dir / "wandb_run_id.txt"
    if id_file.is_file():
        return _id_safe(read_text(id_file).strip())
    import uuid

    # wandb refuses ids with characters such as ':' or '/' (after the models have loaded): the exp_name
    # stays the run's display name, its id keeps only the characters every id accepts
    run_id = f"{_id_safe(exp_name[:40])}-{uuid.uuid4().hex[:8]}"
    id_file.write_text(run_id)
    return run_id


def _id_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)
