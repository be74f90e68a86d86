"""How a student rank writes and reads its part of a checkpoint (the layout: opcd/runs/checkpoint.py).

One rank: a Hugging Face folder (`model/`, loadable by transformers and vLLM) and `optimizer.pt`,
the simplest format there is. Several ranks (FSDP2): torch.distributed.checkpoint, every rank writing
its own shard file of the model (`weights/`) and of the optimizer (`optimizer/`), so nothing is
gathered on one process; rank 0 adds `model_config/` (config and tokenizer) so that a later export
needs nothing else. A Hugging Face export (`model/`, gathered one tensor at a time in the model's
dtype: opcd/workers/hf_export.py) is written only when asked. Every rank
returns the SHA-256 of the files it wrote, so the hashing is spread like the writing.

Several ranks can write in the background (`start_save(..., background=True)`, trainer.async_save):
each rank copies its shards to host memory before the call returns (so the next optimiser step cannot
reach the files), then one thread per rank writes and hashes them while training goes on and reports
the checksums (or its error) in the folder; the driver publishes the checkpoint only once every rank
has reported (opcd/trainer.py, opcd/runs/checkpoint.py `written_checksums`).
"""

from __future__ import annotations

import copy
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from opcd.runs.checkpoint import (MODEL, MODEL_CONFIG, OPTIMIZER_FILE, SHARDED_OPTIMIZER, WEIGHTS, WRITTEN, file_sha256,
                                  report_written)
from opcd.errors import OpcdError
from opcd.workers import distributed as D
from opcd.workers.hf_export import export_sharded_model

_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")  # torch.distributed.checkpoint's file per rank


def save(model, optimizer, tokenizer, folder: str | Path, rank: int, world_size: int,
         export: bool, export_dtype: torch.dtype | None = None) -> dict[str, str]:
    """Write this rank's part of the checkpoint into `folder`; -> checksums of the files it wrote."""
    return start_save(model, optimizer, tokenizer, folder, rank, world_size, export, export_dtype=export_dtype).result()


def start_save(model, optimizer, tokenizer, folder: str | Path, rank: int, world_size: int, export: bool,
               background: bool = False, group=None, export_dtype: torch.dtype | None = None) -> Future:
    """Begin writing this rank's part of the checkpoint; -> a Future of the checksums of its files.
    With `background` (several ranks only; `group`: the process group the writers coordinate over,
    distributed.checkpoint_group) the shards are staged in host memory and written by a thread; the
    Hugging Face export (several ranks: tensor by tensor in `export_dtype`, default the parameters' dtype;
    opcd/workers/hf_export.py) and rank 0's config are written before this returns either way (the export
    gathers over the training's group, which the main thread owns)."""
    folder = Path(folder)
    if world_size == 1:
        model.save_pretrained(folder / MODEL)
        tokenizer.save_pretrained(folder / MODEL)
        torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
        return _done(_checksums(folder, rank))
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    parts = {WEIGHTS: {"model": get_model_state_dict(model)},
             SHARDED_OPTIMIZER: {"optimizer": get_optimizer_state_dict(model, optimizer)}}
    if background:
        parts = _staged(parts)  # training changes the parameters in place from the next step on
    else:
        _write_shards(parts, folder, None)
    if export:  # every rank takes part in each tensor's gather; rank 0 writes
        export_sharded_model(model, tokenizer, folder / MODEL, rank, export_dtype or next(model.parameters()).dtype)
    if rank == 0:  # the config in the model's own dtype, so `opcd export` writes that dtype too
        config = copy.deepcopy(model.config)
        config.dtype = export_dtype or config.dtype
        config.save_pretrained(folder / MODEL_CONFIG)
        tokenizer.save_pretrained(folder / MODEL_CONFIG)
    if not background:
        return _done(_checksums(folder, rank))
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opcd-checkpoint")
    written = writer.submit(_write_and_hash, parts, folder, rank, group)
    writer.shutdown(wait=False)  # the thread ends with its one job
    return written


def _staged(parts: dict) -> dict:
    """A host-memory copy of every tensor in `parts` (a DTensor keeps its sharding, with a copied local
    shard): what torch.distributed.checkpoint.async_save stages, done here so the weights and the
    optimizer are written by one thread, one after the other, over one group."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                          use_async_staging=False, use_non_blocking_copy=False))
    try:
        return stager.stage(parts)
    finally:
        stager.close()


def _write_shards(parts: dict, folder: Path, group) -> None:
    import torch.distributed.checkpoint as dcp

    for name, state in parts.items():
        dcp.save(state, checkpoint_id=folder / name, process_group=group)


def _write_and_hash(parts: dict, folder: Path, rank: int, group) -> dict[str, str]:
    """The background thread's job: write, hash, and report either outcome in the folder for the driver."""
    try:
        _write_shards(parts, folder, group)
        checksums = _checksums(folder, rank)
    except BaseException as exc:
        report_written(folder, rank, error=exc)
        raise
    report_written(folder, rank, checksums)
    return checksums


def _done(checksums: dict[str, str]) -> Future:
    future = Future()
    future.set_result(checksums)
    return future


def load(model, optimizer, folder: str | Path, world_size: int, with_optimizer: bool) -> None:
    """Read a checkpoint written by `save` with the same kind of group (one rank, or several: a
    sharded checkpoint loads on any number of ranks > 1, resharded by torch.distributed.checkpoint)."""
    folder = Path(folder)
    sharded = (folder / WEIGHTS).is_dir()
    if sharded != (world_size > 1):
        raise OpcdError(f"checkpoint {folder} was written by {'several ranks' if sharded else 'one rank'}; "
                        f"resume it with ray.ranks_per_group {'> 1' if sharded else '= 1'} "
                        f"(or start from its Hugging Face export with model.path)")
    if not sharded:
        _load_one_rank(model, optimizer, folder, with_optimizer)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    D.release(model)  # gathered parameters are plain tensors: the loader expects the sharded ones
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=folder / WEIGHTS)
    set_model_state_dict(model, state["model"])
    if with_optimizer:
        state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=folder / SHARDED_OPTIMIZER)
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def _load_one_rank(model, optimizer, folder: Path, with_optimizer: bool) -> None:
    from safetensors.torch import load_file

    state = {}
    for shard in sorted((folder / MODEL).glob("*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied embeddings are saved once; anything else missing means a broken checkpoint
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {folder} does not match the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if with_optimizer:
        optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, weights_only=True))


def _checksums(folder: Path, rank: int) -> dict[str, str]:
    """The files this rank wrote: its own shard files; rank 0 also everything that is not a shard."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if WRITTEN in path.relative_to(folder).parts:  # the ranks' reports (background saves): not checkpoint files
            continue
        match = _RANK_FILE.match(path.name)
        if path.is_file() and (int(match.group(1)) if match else 0) == rank:
            out[path.relative_to(folder).as_posix()] = file_sha256(path)
    return out
