"""The safetensors files of a Hugging Face folder written tensor by tensor (opcd/runs/hf_files.py): the
names and files transformers writes and reads, split at the size limit."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from opcd.runs.hf_files import SafetensorsWriter, tied_names


def test_tensors_go_into_one_file_or_into_numbered_files_with_an_index(tmp_path):
    tensors = {f"layer.{i}.weight": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    one = SafetensorsWriter(tmp_path / "one")
    for name, tensor in tensors.items():
        one.add(name, tensor)
    one.close()
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["model.safetensors"]
    assert load_file(tmp_path / "one" / "model.safetensors").keys() == tensors.keys()

    several = SafetensorsWriter(tmp_path / "several", limit=2 * 1024)  # two tensors a file
    for name, tensor in tensors.items():
        several.add(name, tensor)
    several.close()
    index = json.loads((tmp_path / "several" / "model.safetensors.index.json").read_text())
    files = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted({*index["weight_map"].values()}) == files and index["metadata"]["total_size"] == 5 * 1024
    assert sorted(p.name for p in (tmp_path / "several").glob("*.safetensors")) == files  # no temporary left
    read = {k: v for f in files for k, v in load_file(tmp_path / "several" / f).items()}
    assert all(torch.equal(read[name], tensor) for name, tensor in tensors.items())
    assert index["weight_map"]["layer.4.weight"] == files[2]


def test_an_empty_model_still_gets_its_file(tmp_path):
    writer = SafetensorsWriter(tmp_path)
    writer.close()
    assert (tmp_path / "model.safetensors").is_file()


def test_tied_weights_are_named_once_under_their_first_name():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(4, 2)
            self.head = torch.nn.Linear(2, 4, bias=False)
            self.head.weight = self.embed.weight

    assert tied_names(Tied()) == {"head.weight"}
