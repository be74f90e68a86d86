"""How a student rank writes and reads its part of a checkpoint (the layout: opcd/runs/checkpoint.py).

One rank: a Hugging Face folder (`model/`, loadable by transformers and vLLM) and `optimizer.pt`,
the simplest format there is. Several ranks (FSDP2): torch.distributed.checkpoint, every rank writing
its own shard file of the model (`weights/`) and of the optimizer (`optimizer/`), so nothing is
gathered on one process; rank 0 adds `model_config/` (config and tokenizer) so that a later export
needs nothing else. A Hugging Face export (`model/`, gathered) is written only when asked. Every rank
returns the SHA-256 of the files it wrote, so the hashing is spread like the writing.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from opcd.runs.checkpoint import MODEL, MODEL_CONFIG, OPTIMIZER_FILE, SHARDED_OPTIMIZER, WEIGHTS, file_sha256
from opcd.errors import OpcdError
from opcd.workers import distributed as D

_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")  # torch.distributed.checkpoint's file per rank


def save(model, optimizer, tokenizer, folder: str | Path, rank: int, world_size: int,
         export: bool) -> dict[str, str]:
    """Write this rank's part of the checkpoint into `folder`; -> checksums of the files it wrote."""
    folder = Path(folder)
    if world_size == 1:
        model.save_pretrained(folder / MODEL)
        tokenizer.save_pretrained(folder / MODEL)
        torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
        return _checksums(folder, rank)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=folder / WEIGHTS)
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=folder / SHARDED_OPTIMIZER)
    if export:
        state = D.full_state_dict(model)  # every rank takes part in the gather; rank 0 writes
        if rank == 0:
            model.save_pretrained(folder / MODEL, state_dict=state)
            tokenizer.save_pretrained(folder / MODEL)
    if rank == 0:
        model.config.save_pretrained(folder / MODEL_CONFIG)
        tokenizer.save_pretrained(folder / MODEL_CONFIG)
    return _checksums(folder, rank)


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
        match = _RANK_FILE.match(path.name)
        if path.is_file() and (int(match.group(1)) if match else 0) == rank:
            out[path.relative_to(folder).as_posix()] = file_sha256(path)
    return out
