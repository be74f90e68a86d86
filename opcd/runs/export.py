"""Hugging Face exports of sharded checkpoints: `opcd export RUN_DIR STEP`, and what `opcd evaluate`
reads when a checkpoint has no export.

A checkpoint written by several ranks holds its weights as torch.distributed.checkpoint shards
(`weights/`, one file per rank) plus `model_config/` (config and tokenizer). This reads the shards on
one process, without a process group, one full tensor at a time, and writes a folder that transformers
and vLLM load, in the model's dtype. A one-rank checkpoint's `model/` already is such a folder.

    opcd export runs/med 40          # -> runs/med/global_step_40/model
    opcd export runs/med best        # the checkpoint with the best held-out score
"""

from __future__ import annotations

import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from opcd.runs.checkpoint import (COMPLETE, MODEL, MODEL_CONFIG, WEIGHTS, add_files, complete_steps,
                                  open_like_umask, step_dir, verify_checkpoint)
from opcd.data.files import read_json
from opcd.runs.hf_files import SafetensorsWriter, on_disk_names, tied_names
from opcd.errors import OpcdError


def export_checkpoint(run_dir: Path, step: int) -> Path:
    """The Hugging Face folder of checkpoint `step`, written into it (and listed in its checksums)
    if it is not there yet."""
    folder = step_dir(run_dir, step)
    if not (folder / COMPLETE).is_file():
        raise OpcdError(f"no complete checkpoint for step {step} in {run_dir} (found {complete_steps(run_dir)})")
    _check_intact(folder, "not exporting it")
    target = folder / MODEL
    if target.is_dir():  # listed in the checksums, so verified above
        return target
    tmp = folder / f".{MODEL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_hf_folder(folder, tmp)
        open_like_umask(tmp)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    add_files(folder, MODEL)
    return target


def step_scores(run_dir: Path) -> tuple[dict[int, float], str]:
    """Held-out score per step and where it was read: `opcd evaluate`'s results (evaluation/results.json,
    every checkpoint on the same items), else the evaluations of `opcd distill` (eval.json: those during
    training, trainer.eval_freq, and the one after training, at the last step); ({}, "") when the run
    has neither."""
    run_dir = Path(run_dir)
    evaluated, during = run_dir / "evaluation" / "results.json", run_dir / "eval.json"
    source = evaluated if evaluated.is_file() else during if during.is_file() else None
    if source is None:
        return {}, ""
    try:
        scores = _scores_in(run_dir, _read_json(source), source == evaluated)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise OpcdError(f"{source}: not the held-out scores opcd writes (expected step -> score numbers)") from None
    # a non-finite score (a diverged checkpoint) is never the best one
    return {step: score for step, score in scores.items() if math.isfinite(score)}, str(source)


def _scores_in(run_dir: Path, table: dict, evaluated: bool) -> dict[int, float]:
    if evaluated:
        return {int(step): float(score) for step, score in table.get("checkpoints", {}).items()}
    prefix = "student_step_"
    scores = {int(name[len(prefix):]): float(result["score"]) for name, result in table.items()
              if name.startswith(prefix)}
    after = table.get("student_after")
    step = after.get("step", _final_step(run_dir)) if isinstance(after, dict) else None
    if step is not None and "score" in after:  # the after-training evaluation scored the last checkpoint
        scores.setdefault(int(step), float(after["score"]))
    return scores


def _final_step(run_dir: Path) -> int | None:
    """The last step of a finished run (summary.json), for an eval.json written before its
    `student_after` named its step."""
    summary = run_dir / "summary.json"
    return _read_json(summary).get("final_step") if summary.is_file() else None


def best_step(run_dir: Path) -> int:
    """The complete checkpoint with the highest held-out score (the later one on a tie)."""
    scores, source = step_scores(run_dir)
    on_disk = set(complete_steps(run_dir))
    kept = {step: score for step, score in scores.items() if step in on_disk}
    if not kept:
        found = f"scores for steps {sorted(scores)} in {source}" if scores else "no held-out scores"
        raise OpcdError(f"{run_dir}: no best checkpoint to export ({found}; complete checkpoints {sorted(on_disk)}): "
                        f"run `opcd evaluate {run_dir}` first, or name a step")
    return max(kept, key=lambda step: (kept[step], step))


def _check_intact(folder: Path, refusal: str) -> None:
    """Every reader of a checkpoint's weights checks them first: a flipped byte in model.safetensors
    loads fine and scores as gibberish."""
    problem = verify_checkpoint(folder)
    if problem is not None:
        raise OpcdError(f"checkpoint {folder} is damaged ({problem}); {refusal}")


def _read_json(path: Path) -> dict:
    return read_json(path, OpcdError)


@contextmanager
def model_folder(source: str | Path, scratch: Path):
    """A model path to load: `source` itself, unless it is a checkpoint folder, whose export is used
    or, if it has none, written under `scratch` for the duration of the block (no disk kept)."""
    folder = Path(source)
    if not (folder / COMPLETE).is_file():
        yield str(source)
        return
    _check_intact(folder, "not evaluating it")
    if (folder / MODEL).is_dir():
        yield str(folder / MODEL)
        return
    out = Path(scratch) / f".export_{folder.name}"
    shutil.rmtree(out, ignore_errors=True)
    try:
        write_hf_folder(folder, out)
        yield str(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def write_hf_folder(folder: Path, out: Path) -> None:
    """The Hugging Face folder of a sharded checkpoint, read and written one tensor at a time in the dtype
    of its `model_config/` (the model's own: the trainer writes it so), holding one file's worth at most."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / WEIGHTS).is_dir() or not (folder / MODEL_CONFIG).is_dir():
        raise OpcdError(f"{folder} has neither a Hugging Face folder ({MODEL}/) nor sharded weights "
                        f"({WEIGHTS}/ and {MODEL_CONFIG}/) to export")
    config = AutoConfig.from_pretrained(folder / MODEL_CONFIG)
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, str(config.dtype or "float32"))
    with torch.device("meta"):  # the architecture only: names and tied weights; the values are the checkpoint's
        model = AutoModelForCausalLM.from_config(config)
    files = SafetensorsWriter(Path(out), convert=on_disk_names(model))
    for name, tensor in sharded_tensors(folder / WEIGHTS, "model", skip=tied_names(model)):
        files.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    files.close()
    config.save_pretrained(out)
    for path in (folder / MODEL_CONFIG).iterdir():  # tokenizer files (config.json is already written)
        if path.is_file() and not (out / path.name).exists():
            shutil.copy2(path, out / path.name)


def sharded_tensors(path: Path, key: str, skip: set[str] = frozenset()):
    """(name, full tensor) for each tensor saved under `key` in a torch.distributed.checkpoint folder but
    those named in `skip` (a tied alias), read one at a time on this process (no process group): only that
    tensor's chunks are read."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = f"{key}."
    for fqn, meta in FileSystemReader(path).read_metadata().state_dict_metadata.items():
        if not fqn.startswith(prefix) or not isinstance(meta, TensorStorageMetadata):
            continue
        name = fqn[len(prefix):]
        if name in skip:
            continue
        state = {key: {name: torch.empty(meta.size, dtype=meta.properties.dtype)}}
        dcp.load(state, storage_reader=FileSystemReader(path), no_dist=True)
        yield name, state[key][name]
