"""A Hugging Face folder written from a sharded (FSDP2) model one tensor at a time, in the export dtype.

Every rank takes part in each tensor's all-gather (`distributed.full_tensors`, which casts the shard
before gathering); only rank 0 keeps the gathered tensors, appending them to the current safetensors
file and writing it out when it reaches `shard_bytes`. Rank 0 therefore holds at most one file's worth
of tensors (plus the one being gathered), instead of the whole state dict in the training dtype (fp32
master weights: 32 GB for an 8B model), and the files are in the model's own dtype (bf16: half the
bytes). Files and names as `save_pretrained` writes them (opcd/runs/hf_files.py), and `config.json`
with the export dtype.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from opcd.runs.hf_files import SHARD_BYTES, SafetensorsWriter, on_disk_names, tied_names
from opcd.workers import distributed as D


def export_sharded_model(model, tokenizer, folder: str | Path, rank: int, dtype: torch.dtype,
                         shard_bytes: int = SHARD_BYTES) -> None:
    """Write `model` (sharded over every rank of the default group; each must call this) as a Hugging
    Face folder at `folder`, its floating tensors in `dtype`. Rank 0 writes; the others only gather."""
    folder = Path(folder)
    tied = tied_names(model)
    files = SafetensorsWriter(folder, shard_bytes, on_disk_names(model)) if rank == 0 else None
    # a tied alias (lm_head.weight) is not gathered at all: the file holds it once, under its first name
    for name, tensor in D.full_tensors(model, dtype, skip=tied):
        if files is not None:
            files.add(name, tensor)
    if files is None:
        return
    files.close()
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
