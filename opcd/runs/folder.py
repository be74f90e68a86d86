"""A run folder holds one run: a lock while it runs, a resume that continues the SAME run, and a
finished run left alone.

`@claims_run_folder` wraps a pipeline whose first argument is the config (opcd distill, offpolicy
train, each OEL consolidation). Before the pipeline loads anything it

* creates `runs_dir/exp_name` (an unwritable place is one line naming it) and takes its lock
  (`opcd.lock`: pid, host, process start time). A second run on the same folder refuses in one line
  naming the holder; a lock whose process is gone (kill -9, a crash) is taken over;
* `trainer.resume=never` in a folder with history: the old run's files move to a sibling folder
  `<exp_name>.old-<UTC time>` (nothing is deleted), so the new run starts empty and a crash followed
  by a plain rerun resumes the NEW run, never the old one;
* `trainer.resume=auto` with a checkpoint: compares the saved `config.yaml` with the new config.
  A setting that changes the run (weights, data stream, what is compared) must be equal, else one
  line names each key with its old and new value; `trainer.resume_override=[trainer.lr]` accepts
  the listed changes on purpose. Settings in `FREE` (where output goes, how often it is saved or
  evaluated, how far the run goes, how fast it computes; `game.*` outside text games) may change freely;
* a run whose last step is saved and whose summary is written is complete: the pipeline does not
  run again; the stored summary is returned and the report's path is logged.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import socket
import time
from contextlib import contextmanager, suppress
from pathlib import Path

from opcd.runs.checkpoint import latest_checkpoint, step_dir, verify_checkpoint, write_text_atomic
from opcd.runs.identity import path_identity
from opcd.config import GAME_TASK, DistillConfig, Machine, resolve, to_yaml
from opcd.errors import ConfigError, DataError, OpcdError
from opcd.data.files import read_json, read_yaml

log = logging.getLogger("opcd")
LOCK = "opcd.lock"
# Dotted keys (or section prefixes ending in ".") a resume may change without trainer.resume_override.
FREE = (
    "trainer.exp_name", "trainer.runs_dir", "trainer.resume", "trainer.resume_override",
    "trainer.total_training_steps", "trainer.save_freq", "trainer.loggers", "trainer.wandb_project",
    "trainer.keep_last_n", "trainer.hf_export",  # which checkpoints are kept/exported: nothing learnt changes
    "trainer.async_save",
    "trainer.eval_freq", "trainer.eval_before", "trainer.eval_after", "trainer.max_consecutive_nonfinite",
    "trainer.num_threads", "trainer.micro_batch_size", "trainer.micro_batch_tokens", "trainer.padding_free",
    "model.attn_implementation", "model.activation_checkpointing", "model.cpu_offload",
    "loss.lm_head_chunk_size", "rollout.vllm_gpu_memory_utilization", "rollout.vllm_cpu_kv_cache_gb",
    "rollout.vllm_enforce_eager", "ray.address", "ray.num_cpus",
    "evaluate.", "extract.", "oel.",  # settings of other commands
)
_HELD: set[Path] = set()  # locks this process holds (a lock naming our own pid is stale otherwise)


def claims_run_folder(pipeline):
    """Decorator: run `pipeline(cfg, ...)` holding cfg.run_dir (see the module docstring)."""
    @functools.wraps(pipeline)
    def run(cfg: DistillConfig, *args, **kwargs):
        with claimed(cfg) as finished:
            return finished if finished is not None else pipeline(cfg, *args, **kwargs)
    return run


@contextmanager
def claimed(cfg: DistillConfig):
    """Hold the run folder; yields the stored summary when the run is already complete, else None."""
    run_dir = cfg.run_dir
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OpcdError(f"{run_dir}: cannot create the run folder: {exc.strerror or exc}") from None
    lock = acquire_lock(run_dir)
    try:
        if cfg.trainer.resume == "never":
            move_history_aside(run_dir)
            record_inputs(cfg, run_dir)
            yield None
        else:
            finished = check_resume(cfg, run_dir)
            if finished is None:
                record_inputs(cfg, run_dir)
            yield finished
    finally:
        release_lock(lock)
        if created:  # a run refused before writing anything leaves no folder behind
            with suppress(OSError):
                run_dir.rmdir()  # only if empty


# -- the lock ------------------------------------------------------------------------------------------

def acquire_lock(run_dir: Path) -> Path:
    """Create `run_dir/opcd.lock` atomically (complete content or nothing), taking over a stale one."""
    path = Path(run_dir) / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid())}
    staging = path.with_name(f".{LOCK}.{os.getpid()}")
    try:
        staging.write_text(json.dumps(me))
        for _ in range(3):
            try:
                os.link(staging, path)  # fails if the lock exists: never half-written, never two holders
                _HELD.add(path)
                return path
            except FileExistsError:
                holder = _holder(path)
                if _alive(holder):
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime))
                    raise OpcdError(f"{run_dir} is in use by another run (pid {holder.get('pid')} on "
                                    f"{holder.get('host')}, since {since}): wait for it to end or pick another "
                                    f"trainer.exp_name; if that process is gone, delete {path}")
                log.warning("%s: taking over the lock of pid %s, which is no longer running", run_dir,
                            holder.get("pid"))
                _remove_stale(path, holder)
        raise OpcdError(f"{path}: could not take the lock (other runs keep taking it)")
    except OSError as exc:
        raise OpcdError(f"{run_dir}: cannot write to the run folder: {exc.strerror or exc}") from None
    finally:
        staging.unlink(missing_ok=True)


def release_lock(path: Path) -> None:
    _HELD.discard(path)
    if _holder(path).get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def _holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(holder: dict) -> bool:
    """Is the process that wrote the lock still running? A lock from another host cannot be checked
    from here and counts as alive; an unreadable lock (not written by opcd) counts as stale."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    if pid == os.getpid():
        return any(_holder(p).get("pid") == pid for p in _HELD)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    started = holder.get("started")
    return started is None or started == _start_time(pid)  # a reused pid is another process


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _remove_stale(path: Path, holder: dict) -> None:
    """Remove the stale lock unless another run replaced it meanwhile (then the next link attempt
    sees the live one)."""
    if _holder(path) == holder:
        path.unlink(missing_ok=True)


# -- a fresh start -------------------------------------------------------------------------------------

def move_history_aside(run_dir: Path) -> Path | None:
    """trainer.resume=never: move everything but the lock to `<run_dir>.old-<UTC time>`."""
    old = [p for p in Path(run_dir).iterdir() if p.name != LOCK and not p.name.startswith(f".{LOCK}.")]
    if not old:
        return None
    aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    suffix = 1
    while aside.exists():
        aside, suffix = aside.with_name(f"{aside.name.split('~')[0]}~{suffix}"), suffix + 1
    aside.mkdir()
    for path in old:
        os.rename(path, aside / path.name)
    log.warning("trainer.resume=never: the previous run in %s was moved to %s", run_dir, aside)
    return aside


# -- resuming the same run -----------------------------------------------------------------------------

def check_resume(cfg: DistillConfig, run_dir: Path) -> dict | None:
    """Refuse a resume whose run-changing settings differ from the saved run's; return the stored
    summary when the run is already complete."""
    found = latest_checkpoint(run_dir)
    if found is None:
        return None
    step, _ = found
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"{run_dir} has checkpoints but no config.yaml, so a resume cannot be checked: "
                          f"set trainer.resume=never to start afresh (the old files are moved aside)")
    saved = _load_yaml(saved_path)
    changed = config_changes(saved, _flatten(_plain(cfg)))
    if GAME_TASK not in (saved.get("task.name"), cfg.task.name):  # game settings only matter to games
        changed = [c for c in changed if not c[0].startswith("game.")]
    refused = [c for c in changed if not _free(c[0]) and c[0] not in cfg.trainer.resume_override]
    if refused:
        listing = "; ".join(f"{key} was {old!r}, now {new!r}" for key, old, new in refused)
        keys = ",".join(key for key, _, _ in refused)
        raise ConfigError(f"{run_dir} holds a run saved at step {step} with other settings ({listing}): to change "
                          f"them in this run pass trainer.resume_override=[{keys}], to start afresh "
                          f"trainer.resume=never (the old run is moved aside), or pick another trainer.exp_name")
    for key, old, new in changed:
        if key in cfg.trainer.resume_override:
            log.warning("resuming %s with %s changed from %r to %r (trainer.resume_override)", run_dir, key, old, new)
    check_inputs(cfg, run_dir, step)
    return _complete(cfg, run_dir, step)


# -- the content behind the paths ----------------------------------------------------------------------

INPUTS = "inputs.json"
# Settings naming files whose content makes the run: a file copied over in place keeps its path, so the
# settings check above cannot see it.
INPUT_KEYS = ("model.path", "model.teacher_path", "task.train_data", "task.test_data", "task.validation_data",
              "task.context_path", "game.states_path")
_CHECKOUT = Path(__file__).resolve().parents[2]  # relative context paths also resolve against the checkout


def input_identities(cfg: DistillConfig) -> dict[str, dict]:
    """Setting -> content identity of the file or folder it names (opcd/runs/identity.py); names that are
    not local paths (hub ids, bundled: data) are their own identity."""
    out = {}
    for key in INPUT_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name, None)
        if not isinstance(value, str) or not value:
            continue
        local = Path(value).expanduser()
        if not local.exists() and not local.is_absolute() and (_CHECKOUT / value).exists():
            local = _CHECKOUT / value
        out[key] = path_identity(local if local.exists() else value)
    return out


def record_inputs(cfg: DistillConfig, run_dir: Path) -> None:
    write_text_atomic(run_dir / INPUTS, json.dumps(input_identities(cfg), indent=1, sort_keys=True))


def check_inputs(cfg: DistillConfig, run_dir: Path, step: int) -> None:
    """Refuse a resume whose input files changed content in place, as a changed setting is refused."""
    path = run_dir / INPUTS
    if not path.is_file():
        return  # a run from before inputs were recorded: recorded from now on
    saved = read_json(path, ConfigError, "a JSON object of setting -> file identity")
    now = input_identities(cfg)
    changed = [key for key in INPUT_KEYS if key in saved and key in now and saved[key] != now[key]
               and key not in cfg.trainer.resume_override]
    if changed:
        listing = "; ".join(f"{key} ({getattr(getattr(cfg, key.split('.')[0]), key.split('.')[1])}): "
                            f"{_first_difference(saved[key], now[key])}" for key in changed)
        raise ConfigError(f"{run_dir} holds a run saved at step {step} whose input files have changed since "
                          f"({listing}): to go on with the new files pass trainer.resume_override="
                          f"[{','.join(changed)}], to start afresh trainer.resume=never")


def _first_difference(old: dict, new: dict) -> str:
    for name in sorted(set(old) | set(new)):
        if name not in new:
            return f"{name} is gone"
        if name not in old:
            return f"{name} is new"
        if old[name] != new[name]:
            return f"{name} has other content"
    return "other content"


def config_changes(saved: dict, now: dict) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, new value) for every key whose value differs; a key the saved config
    lacks (written by an older opcd) counts as its default."""
    defaults = _flatten(_plain(resolve(DistillConfig(), Machine.here())))
    return [(key, saved.get(key, defaults.get(key)), value) for key, value in now.items()
            if saved.get(key, defaults.get(key)) != value]


def _complete(cfg: DistillConfig, run_dir: Path, step: int) -> dict | None:
    summary_path = run_dir / "summary.json"
    if step < cfg.trainer.total_training_steps or not summary_path.is_file():
        return None
    try:
        summary = read_json(summary_path, expected="a JSON object with 'final_step'")
    except DataError as exc:
        log.warning("%s; finishing the run again rewrites it", exc)
        return None
    if summary.get("final_step") != step:
        return None
    problem = verify_checkpoint(step_dir(run_dir, step))
    if problem is not None:  # the run's result is that checkpoint: a damaged one is not a finished run
        log.warning("%s: the last checkpoint is damaged (%s), so the run is not complete: resuming from the "
                    "newest intact checkpoint", run_dir, problem)
        return None
    report = run_dir / "report" / "report.html"  # the name the end of a run prints (opcd/cli.py)
    log.info("%s is complete (step %d of %d); its report: %s. A larger trainer.total_training_steps continues "
             "it, trainer.resume=never starts it afresh (the old run is moved aside)", run_dir, step,
             cfg.trainer.total_training_steps, report if report.is_file() else f"none yet (opcd report {run_dir})")
    return {**summary, "complete": True}


def _free(key: str) -> bool:
    return any(key == free or (free.endswith(".") and key.startswith(free)) for free in FREE)


def _plain(cfg: DistillConfig) -> dict:
    import yaml

    return yaml.safe_load(to_yaml(cfg))  # the same normal form as the saved config.yaml


def read_saved_config(path: Path) -> dict:
    """A run's config.yaml as a plain mapping; an unreadable one (torn, not UTF-8, an alias bomb, not a
    mapping) is one ConfigError line naming it."""
    data = read_yaml(path, ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a readable config (expected a mapping of sections, "
                          f"found {'nothing' if data is None else type(data).__name__})")
    return data


def _load_yaml(path: Path) -> dict:
    return _flatten(read_saved_config(path))


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# -- a full disk ---------------------------------------------------------------------------------------
FULL_BELOW_BYTES = 64 << 20  # a write that failed with less than this left failed for want of space


@contextmanager
def disk_full_as_enospc(folder: Path):
    """Turn a failure while writing into `folder` into OSError(ENOSPC) when the disk is (nearly) full:
    torch.save reports a full disk as "enforce fail at inline_container.cc", and inside a worker it
    arrives as a WorkerError; checkpoint.unpublished_on_failure then gives its one "no space left" line."""
    try:
        yield
    except Exception as exc:
        if _free_bytes(folder) < FULL_BELOW_BYTES:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder)) from exc
        raise


def _free_bytes(folder: Path) -> int:
    try:
        stats = os.statvfs(folder)
    except OSError:
        return FULL_BELOW_BYTES  # cannot tell: leave the error as it is
    return stats.f_bfree * stats.f_frsize
