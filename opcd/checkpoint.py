"""Atomic checkpoints in a run folder.

Layout: `<run_dir>/global_step_<k>/` holds `model/` (a Hugging Face folder), `optimizer.pt`,
`trainer_state.json` and a `COMPLETE` marker; `<run_dir>/latest_checkpointed_iteration.txt` names the
newest complete step. A checkpoint is written into a hidden temporary folder and renamed into
place only when complete, then the pointer is replaced atomically, so a crash at any moment leaves
the previous checkpoint intact and findable.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from opcd.errors import OpcdError

LATEST = "latest_checkpointed_iteration.txt"
COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^global_step_(\d+)$")


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"global_step_{step}"


def save_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None], trainer_state: dict) -> Path:
    """`write(tmp_folder)` fills the folder (model, optimiser); we add the state and publish it."""
    run_dir = Path(run_dir)
    final = step_dir(run_dir, step)
    tmp = run_dir / f".global_step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        write_text_atomic(tmp / "trainer_state.json", json.dumps(trainer_state, indent=1))
        (tmp / COMPLETE).write_text(str(step))
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): replace the old copy
            shutil.rmtree(final)
        os.rename(tmp, final)
        write_text_atomic(run_dir / LATEST, str(step))
    except BaseException as exc:  # any failure (an exception in `write`, Ctrl-C): drop the partial copy
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OpcdError(f"no space left on device while writing checkpoint {final} "
                            f"(the previous checkpoint is intact)") from exc
        raise
    return final


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint. Folders with a COMPLETE marker are the truth; the pointer
    file only names one for people and tools (a crash between publishing a folder and updating the
    pointer must not send a resume back to an older step)."""
    run_dir = Path(run_dir)
    steps = sorted((int(m.group(1)) for p in run_dir.glob("global_step_*")
                    if (m := _STEP_DIR.match(p.name)) and (p / COMPLETE).is_file()), reverse=True)
    return (steps[0], step_dir(run_dir, steps[0])) if steps else None


def read_trainer_state(folder: Path) -> dict:
    return json.loads((Path(folder) / "trainer_state.json").read_text())


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
