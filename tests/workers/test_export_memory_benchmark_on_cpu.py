"""benchmarks/export_memory.py on 2 gloo ranks: the tensor-by-tensor export (opcd/workers/hf_export.py)
holds about one shard on rank 0 and writes the model's dtype, where the gathered state dict held and
wrote every tensor in the training dtype (fp32), the tied embedding twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_the_export_holds_one_shard_and_writes_half_the_bytes(tiny_model, tmp_path):
    out = tmp_path / "figures.json"
    subprocess.run([sys.executable, "export_memory.py", "--model", str(tiny_model), "--shard-mb", "1",
                    "--json", str(out)], cwd=BENCHMARKS, check=True, capture_output=True, timeout=540,
                   env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # CPU and gloo on any machine
    figures = json.loads(out.read_text())
    old, new = figures["old"], figures["new"]
    embedding_mb = 49152 * 64 * 4 / 1e6  # the tiny model's (tied) embedding in fp32
    # fp32 with the tied embedding written twice before; bf16, once, now: (old - one embedding) / 2
    assert new["written_mb"] == pytest.approx((old["written_mb"] - embedding_mb) / 2, rel=0.01)
    assert old["files"] == 1 and new["files"] > 1
    # one shard: the limit, or the one tensor larger than it (the bf16 embedding) with what precedes it
    assert new["tensors_held_mb"] <= 1 + embedding_mb / 2 and old["tensors_held_mb"] > 2 * new["tensors_held_mb"]
