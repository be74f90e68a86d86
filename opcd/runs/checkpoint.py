"""Atomic, checksummed checkpoints in a run folder, with retention.

Layout of `<run_dir>/global_step_<k>/`:

    model/               a Hugging Face folder: the weights of a one-rank run, or the export of a
                         sharded one (written only where asked: trainer.hf_export, `opcd export`)
    optimizer.pt         one rank: the AdamW state
    weights/             several ranks: the model, torch.distributed.checkpoint (a file per rank)
    optimizer/           several ranks: the AdamW state, same format
    model_config/        several ranks: config and tokenizer, so `opcd export` needs nothing else
    trainer_state.json   step, data position, counters
    checksums.sha256     SHA-256 of every file above (`sha256sum -c checksums.sha256` checks it)
    COMPLETE             written last

A checkpoint is written into a hidden temporary folder, its checksums are written, and it is renamed
into place; only then does `latest_checkpointed_iteration.txt` move. A checkpoint written in the
background (several ranks, trainer.async_save) stays in its hidden folder until every rank has
finished; a run that stops before then leaves it unpublished, and the next one removes it. A crash
at any moment leaves the previous checkpoint intact and findable. On resume the newest checkpoint whose files match their
checksums is used; a damaged one is named in one line and skipped. Only the newest checkpoint keeps
the optimizer state (a resume needs nothing older), and `keep_last_n` bounds how many are kept.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from opcd.errors import OpcdError

LATEST = "latest_checkpointed_iteration.txt"
COMPLETE = "COMPLETE"
CHECKSUMS = "checksums.sha256"
TRAINER_STATE = "trainer_state.json"
MODEL = "model"
OPTIMIZER_FILE = "optimizer.pt"
WEIGHTS, SHARDED_OPTIMIZER, MODEL_CONFIG = "weights", "optimizer", "model_config"
OPTIMIZER = (OPTIMIZER_FILE, SHARDED_OPTIMIZER)
# In a checkpoint written in the background: one report per rank once its files are written (`report_written`).
# Files, not answers through Ray, so the driver can publish a written checkpoint even while some ranks are
# stuck in a collective after another rank's failure.
WRITTEN = ".written"
_STEP_DIR = re.compile(r"^global_step_(\d+)$")


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"global_step_{step}"


def save_checkpoint(run_dir: Path, step: int, write: Callable[[Path], dict[str, str] | None],
                    trainer_state: dict) -> Path:
    """`write(tmp_folder)` fills the folder (model, optimiser) and may return the checksums of the
    files it wrote (relative path -> SHA-256; workers hash their own shards in parallel); we hash the
    rest, add the state and publish it."""
    tmp = begin_checkpoint(run_dir, step)
    with unpublished_on_failure(run_dir, step, tmp):
        return publish_checkpoint(run_dir, step, tmp, write(tmp) or {}, trainer_state)


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """A fresh hidden folder to write checkpoint `step` into. Unpublished folders left by earlier
    attempts (a crash, or a run stopped while a checkpoint was written in the background) go first:
    only one checkpoint is ever in progress."""
    run_dir = Path(run_dir)
    for stale in run_dir.glob(".global_step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = run_dir / f".global_step_{step}.tmp"
    tmp.mkdir(parents=True)
    return tmp


def publish_checkpoint(run_dir: Path, step: int, tmp: Path, known: dict[str, str], trainer_state: dict) -> Path:
    """Make the written folder `tmp` checkpoint `step`: hash what the writers did not (`known`: relative
    path -> SHA-256), add the trainer state, checksums and COMPLETE, fsync, rename it into place and move
    the pointer."""
    run_dir = Path(run_dir)
    final = step_dir(run_dir, step)
    open_like_umask(tmp)
    write_text_atomic(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=1))
    _write_checksums(tmp, {rel: known.get(rel) or file_sha256(tmp / rel) for rel in _files(tmp)})
    (tmp / COMPLETE).write_text(str(step))
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step (e.g. after a resume): replace the old copy
        shutil.rmtree(final)
    os.rename(tmp, final)
    write_text_atomic(run_dir / LATEST, str(step))
    return final


@contextmanager
def unpublished_on_failure(run_dir: Path, step: int, tmp: Path):
    """Any failure while checkpoint `step` is written or published (an exception from the writers,
    Ctrl-C) drops the partial folder `tmp`; a full disk is said in one line naming the checkpoint kept."""
    try:
        yield
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            earlier = [s for s in complete_steps(run_dir) if s != step]
            kept = (f"the previous checkpoint, step {earlier[-1]}, is intact" if earlier
                    else "no earlier checkpoint exists, so a rerun starts from the beginning")
            raise OpcdError(f"no space left on device while writing checkpoint {step_dir(run_dir, step)} "
                            f"({kept})") from exc
        raise


def report_written(folder: Path, rank: int, checksums: dict[str, str] | None = None,
                   error: BaseException | None = None) -> None:
    """A rank's report that it finished writing its part of the checkpoint being written in `folder`:
    the checksums of its files, or the error that stopped it."""
    report = {"checksums": checksums} if error is None else {"error": f"{type(error).__name__}: {error}"}
    (Path(folder) / WRITTEN).mkdir(exist_ok=True)
    write_text_atomic(Path(folder) / WRITTEN / f"rank-{rank}.json", json.dumps(report))


def written_reports(folder: Path, ranks: list[int]) -> dict[int, dict]:
    """The reports (`report_written`) of those of `ranks` that have finished writing into `folder`."""
    out = {}
    for rank in ranks:
        path = Path(folder) / WRITTEN / f"rank-{rank}.json"
        if path.is_file():
            out[rank] = json.loads(path.read_text())
    return out


def written_checksums(folder: Path, ranks: list[int], step: int) -> dict[str, str]:
    """Every rank's checksums once all of `ranks` have reported; the first reported error, or a missing
    report, as one line. The reports are then removed: they are not part of the checkpoint."""
    reports = written_reports(folder, ranks)
    for rank in ranks:
        if rank not in reports:
            raise OpcdError(f"student rank {rank} did not report writing checkpoint {step}")
        if "error" in reports[rank]:
            raise OpcdError(f"student rank {rank} could not write checkpoint {step}: {reports[rank]['error']}")
    shutil.rmtree(Path(folder) / WRITTEN, ignore_errors=True)
    return {rel: digest for rank in ranks for rel, digest in reports[rank]["checksums"].items()}


def complete_steps(run_dir: Path) -> list[int]:
    """Steps with a published (COMPLETE) checkpoint, oldest first."""
    return sorted(int(m.group(1)) for p in Path(run_dir).glob("global_step_*")
                  if (m := _STEP_DIR.match(p.name)) and (p / COMPLETE).is_file())


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint. Folders with a COMPLETE marker are the truth; the pointer
    file only names one for people and tools (a crash between publishing a folder and updating the
    pointer must not send a resume back to an older step)."""
    steps = complete_steps(run_dir)
    return (steps[-1], step_dir(run_dir, steps[-1])) if steps else None


def resumable_checkpoint(run_dir: Path, warn: Callable[[str], None]) -> tuple[int, Path] | None:
    """The newest complete checkpoint whose files match their checksums and whose state reads; each
    damaged newer one is named through `warn`. None when the folder has no checkpoint; an error when
    it has some but none is intact (starting over would silently discard the run)."""
    damaged = []
    for step in reversed(complete_steps(run_dir)):
        folder = step_dir(run_dir, step)
        problem = verify_checkpoint(folder)
        if problem is None:
            if damaged:
                warn(f"resuming from {folder} instead")
            return step, folder
        warn(f"checkpoint {folder} is damaged ({problem}); falling back to the previous one")
        damaged.append(f"{folder.name}: {problem}")
    if damaged:
        raise OpcdError(f"no intact checkpoint in {run_dir} ({'; '.join(damaged)}); move the damaged folders "
                        f"away to start over")
    return None


def verify_checkpoint(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder, in a few words, or None when every file listed in its
    checksums is present with the right content and its trainer state reads."""
    folder = Path(folder)
    try:
        expected = read_checksums(folder)
    except OpcdError as exc:
        return str(exc)
    for rel, digest in expected.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        try:
            if file_sha256(path) != digest:
                return f"{rel} does not match its checksum (flipped or truncated bytes)"
        except OSError as exc:
            return f"{rel} cannot be read ({exc.strerror or exc})"
    try:
        read_trainer_state(folder)
    except OpcdError as exc:
        return str(exc)
    return None


def has_optimizer(folder: Path) -> bool:
    """Whether the checkpoint still holds optimizer state (only the newest one keeps it)."""
    return any(rel.split("/", 1)[0] in OPTIMIZER for rel in read_checksums(folder))


def retain(run_dir: Path, current: int, keep_last_n: int) -> list[Path]:
    """After checkpoint `current` is published: drop the optimizer state of every older checkpoint and,
    with `keep_last_n` > 0, the oldest checkpoints beyond that many. Newer folders (left by a run
    that fell back from a damaged checkpoint) are left alone: this run overwrites them. -> removed."""
    run_dir = Path(run_dir)
    older = [s for s in complete_steps(run_dir) if s < current]
    cut = max(0, len(older) - (keep_last_n - 1)) if keep_last_n > 0 else 0
    for trash in run_dir.glob(".global_step_*.deleting"):  # left by a crash during an earlier deletion
        shutil.rmtree(trash, ignore_errors=True)
    removed = []
    for step in older[:cut]:
        folder = step_dir(run_dir, step)
        trash = run_dir / f".{folder.name}.deleting"
        os.rename(folder, trash)  # unpublished first: a crash mid-delete leaves no half-checkpoint
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(folder)
    for step in older[cut:]:
        drop_optimizer(step_dir(run_dir, step))
    return removed


def drop_optimizer(folder: Path) -> None:
    """Remove the optimizer state: the checksums stop listing it first, so a crash halfway leaves a
    valid model-only checkpoint (stray files are ignored), never one whose listed files are missing."""
    folder = Path(folder)
    checksums = read_checksums(folder)
    kept = {rel: digest for rel, digest in checksums.items() if rel.split("/", 1)[0] not in OPTIMIZER}
    if kept != checksums:
        _write_checksums(folder, kept)
    for name in OPTIMIZER:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


def add_files(folder: Path, sub: str) -> None:
    """List the files of a folder added to a published checkpoint (an export) in its checksums."""
    folder = Path(folder)
    checksums = read_checksums(folder)
    for rel in _files(folder / sub):
        checksums[f"{sub}/{rel}"] = file_sha256(folder / sub / rel)
    _write_checksums(folder, checksums)


def read_checksums(folder: Path) -> dict[str, str]:
    path = Path(folder) / CHECKSUMS
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except FileNotFoundError:
        raise OpcdError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OpcdError(f"{path} cannot be read ({_reason(exc)})") from None
    out = {}
    for number, line in enumerate(lines, 1):
        match = re.fullmatch(r"([0-9a-f]{64})  (\S.*)", line)
        if match is None or ".." in Path(match.group(2)).parts or Path(match.group(2)).is_absolute():
            raise OpcdError(f"{path}: line {number} is not '<sha256>  <relative path>'")
        out[match.group(2)] = match.group(1)
    return out


def read_trainer_state(folder: Path) -> dict:
    path = Path(folder) / TRAINER_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OpcdError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise OpcdError(f"{path} cannot be read ({_reason(exc)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise OpcdError(f"{path} is not a trainer state (expected a JSON object with an integer 'step')")
    return state


def open_like_umask(folder: Path) -> None:
    """Give the files and folders under `folder` (and itself) the permissions a plain `open` gives here
    (0o666 / 0o777 less the umask), keeping any wider ones. transformers' `save_pretrained` writes
    `model.safetensors` with mode 600 and `tempfile.mkdtemp` makes 700 folders, so without this a
    checkpoint or the converted model cache is readable by its owner only, unlike every other file."""
    umask = os.umask(0)
    os.umask(umask)
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        wanted = (0o777 if path.is_dir() else 0o666) & ~umask
        mode = path.stat().st_mode & 0o777
        if mode | wanted != mode:
            try:
                path.chmod(mode | wanted)
            except PermissionError:  # someone else's file (a shared cache): leave it as it is
                pass


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_checksums(folder: Path, checksums: dict[str, str]) -> None:
    write_text_atomic(folder / CHECKSUMS, "".join(f"{digest}  {rel}\n" for rel, digest in sorted(checksums.items())))


def _files(folder: Path) -> list[str]:
    """Every file under `folder` (relative, '/'-separated), except the checksums and the marker."""
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*")
                  if p.is_file() and p.name not in (CHECKSUMS, COMPLETE))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
