"""The weight files of a Hugging Face folder, written one tensor at a time: what transformers'
`save_pretrained` writes (`model.safetensors`, or `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json`; tied weights once, under their first name; the names on disk, with the
renamings and fusions transformers applies when loading undone, as its own save does: a Qwen3-MoE's
fused `experts.gate_up_proj` goes back to per-expert `gate_proj`/`up_proj`, which vLLM reads), from
tensors handed over one by one, so a writer never holds more than one file's worth of them. Used for the export of a sharded
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


def on_disk_names(model):
    """The conversion from `model`'s state-dict names to those its Hugging Face files use (a file's
    tensors at a time: every conversion transformers ships maps one tensor to one or several)."""
    from transformers.core_model_loading import revert_weight_conversion

    return lambda tensors: revert_weight_conversion(model, dict(tensors))


class SafetensorsWriter:
    """Rank 0's safetensors files: tensors gathered into the current file until it holds `limit` bytes;
    `convert` (on_disk_names) renames or splits a file's tensors just before it is written."""

    def __init__(self, folder: Path, limit: int = SHARD_BYTES, convert=None):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.limit, self.convert = folder, limit, convert
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

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tensors = self.current
        if self.convert is not None:  # a split leaves views of one tensor: safetensors wants each on its own
            tensors = {name: t.contiguous().clone() for name, t in self.convert(tensors).items()}
        path = self.folder / f".part-{len(self.files):05d}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        self.files.append((path, list(tensors)))
        self.total += sum(t.numel() * t.element_size() for t in tensors.values())
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
