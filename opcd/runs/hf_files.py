"""The weight files of a Hugging Face folder, written one tensor at a time: what transformers'
`save_pretrained` writes (`model.safetensors`, or `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json`; tied weights once, under their first name), from tensors handed over
one by one, so a writer never holds more than one file's worth of them. Used for the export of a sharded
model at a checkpoint (opcd/workers/hf_export.py) and for `opcd export` of a sharded checkpoint
(opcd/runs/export.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size


def tied_names(model) -> set[str]:
    """Names under which an already-listed parameter appears again (lm_head.weight with tied embeddings):
    save_pretrained writes such a tensor once, and loading ties it back."""
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return every - {name for name, _ in model.named_parameters()}


class SafetensorsWriter:
    """Rank 0's safetensors files: tensors gathered into the current file until it holds `limit` bytes."""

    def __init__(self, folder: Path, limit: int = SHARD_BYTES):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.limit = folder, limit
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []  # written under a temporary name, renamed at the end
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.limit:
            self._flush()
        # a copy of its own on the host: the gathered tensor may live on the GPU or alias a buffer
        self.current[name] = tensor.to("cpu", copy=True).contiguous()
        self.current_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f".part-{len(self.files):05d}.safetensors"
        save_file(self.current, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def close(self) -> None:
        if self.current or not self.files:
            self._flush()
        if len(self.files) == 1:
            os.replace(self.files[0][0], self.folder / "model.safetensors")
            return
        count, weight_map = len(self.files), {}
        for index, (path, names) in enumerate(self.files, 1):
            final = f"model-{index:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
