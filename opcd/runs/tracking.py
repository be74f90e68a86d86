"""Experiment tracking: a console progress bar, `metrics.jsonl`, tensorboard and wandb behind one call.

wandb follows WANDB_MODE when set; otherwise it runs online only when WANDB_API_KEY is in the
environment, offline otherwise (so it works with
no network); the key itself is never read into the config or written anywhere by opcd.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from tqdm import tqdm

from opcd import metrics as M

_BAR_KEYS = {M.LOSS_KL: "kl", M.ROLLOUT_SCORE: "score", M.PERF_TOKENS_PER_S: "tok/s",
             M.PERF_STUDENT_GPU_PEAK: "gpu_GB", M.PERF_STUDENT_GPU_RESERVED: "gpu_rsv_GB",
             M.PERF_GPU_USED_MAX: "gpu_used_GB"}


class Tracker:
    def __init__(self, loggers: list[str], run_dir: Path, exp_name: str, config: dict,
                 total_steps: int, start_step: int = 0, wandb_project: str | None = None):
        self.run_dir = Path(run_dir)
        self.bar = None
        self.jsonl = None
        self.tensorboard = None
        self.wandb = None
        if "console" in loggers:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=exp_name, unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=0)
        if "jsonl" in loggers:
            self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        if "wandb" in loggers:
            import wandb

            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wandb.init(project=wandb_project or os.environ.get("WANDB_PROJECT", "opcd"),
                                    name=exp_name, dir=str(self.run_dir), config=config, mode=mode,
                                    resume="allow", id=_wandb_id(self.run_dir, exp_name))

    def log(self, metrics: dict[str, float], step: int) -> None:
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
        (self.bar.write if self.bar else print)(text)

    def summary(self, values: dict[str, float]) -> None:
        if self.wandb:
            self.wandb.summary.update(values)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.jsonl:
            self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def _json_float(value: float):
    return value if math.isfinite(value) else str(value)


def _wandb_id(run_dir: Path, exp_name: str) -> str:
    """A stable run id per run folder, so a resumed run continues the same wandb run."""
    id_file = run_dir / "wandb_run_id.txt"
    if id_file.is_file():
        return id_file.read_text().strip()
    import uuid

    run_id = f"{exp_name[:40]}-{uuid.uuid4().hex[:8]}"
    id_file.write_text(run_id)
    return run_id
