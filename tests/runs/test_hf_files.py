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


def test_a_fused_moe_model_is_written_under_the_names_its_files_use(tmp_path):
    """transformers 5 fuses a Qwen3-MoE's experts on load (`experts.gate_up_proj`); its save splits them
    back into per-expert `gate_proj`/`up_proj`/`down_proj`, the names vLLM reads. Without the conversion the
    export held the fused names."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from opcd.runs.hf_files import on_disk_names

    config = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "reference")
    writer = SafetensorsWriter(tmp_path / "ours", limit=4 * 1024, convert=on_disk_names(model))
    for name, tensor in model.state_dict().items():
        writer.add(name, tensor)
    writer.close()
    config.save_pretrained(tmp_path / "ours")
    ours = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(ours) == set(load_file(tmp_path / "reference" / "model.safetensors"))
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in ours
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").state_dict()
    assert [n for n, t in model.state_dict().items() if not torch.equal(loaded[n], t)] == []
