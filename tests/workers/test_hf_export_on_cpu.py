"""The Hugging Face export of a model sharded over 2 gloo ranks, written one tensor at a time in the export
dtype (opcd/workers/hf_export.py): transformers loads it to exactly the gathered weights cast to that
dtype, in one file or several with an index, tied weights stored once."""

from __future__ import annotations

import json

import pytest
import ray
import torch
from safetensors import safe_open

from opcd.workers.group import WorkerGroup
from opcd.workers.spec import WorkerSpec
from opcd.workers.student import StudentWorker

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


def _export(group: WorkerGroup, folder, dtype: torch.dtype, shard_bytes: int) -> None:
    def write(worker):
        from opcd.workers.hf_export import export_sharded_model

        export_sharded_model(worker.model, worker.tokenizer, folder, worker.rank, dtype, shard_bytes)
    ray.get([worker.__ray_call__.remote(write) for worker in group.workers])


def _loaded(folder, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).state_dict()


def test_a_sharded_export_is_written_tensor_by_tensor_in_the_export_dtype(tiny_model, tmp_path):
    group = WorkerGroup("export", StudentWorker, {"spec": WorkerSpec.build(str(tiny_model), num_threads=1)},
                        world_size=2)
    gathered = group.gather(StudentWorker.state_dict)  # fp32, the training dtype here
    _export(group, tmp_path / "bf16", torch.bfloat16, shard_bytes=2**20)  # forces several files
    _export(group, tmp_path / "fp32", torch.float32, shard_bytes=2**40)
    group.shutdown()

    several = tmp_path / "bf16"
    index = json.loads((several / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    assert len(files) >= 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in several.glob("*.safetensors")) == files
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once, as save_pretrained does
    for name in files:
        with safe_open(several / name, "pt") as f:
            assert {f.get_tensor(key).dtype for key in f.keys()} == {torch.bfloat16}
    assert json.loads((several / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = _loaded(several, torch.bfloat16)
    assert set(loaded) == set(gathered)
    assert [n for n in gathered if not torch.equal(loaded[n], gathered[n].to(torch.bfloat16))] == []

    one = tmp_path / "fp32"
    assert sorted(p.name for p in one.glob("*.safetensors")) == ["model.safetensors"]
    assert not (one / "model.safetensors.index.json").exists()
    loaded = _loaded(one, torch.float32)
    assert [n for n in gathered if not torch.equal(loaded[n], gathered[n])] == []
    assert (one / "tokenizer.json").is_file() or (one / "tokenizer_config.json").is_file()
