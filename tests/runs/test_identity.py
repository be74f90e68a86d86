"""Content identity of model folders and checkpoints (opcd/runs/identity.py)."""

from __future__ import annotations

import os

from opcd.runs.checkpoint import add_files, save_checkpoint, step_dir
from opcd.runs.identity import SMALL_FILE, identity_digest, path_identity


def _model(folder, weights: bytes):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_a_model_folder_copied_over_in_place_has_another_identity(tmp_path):
    """Bug: `opcd evaluate --base` cached scores under a key without the model, and a resume did not see a
    model.safetensors copied over in place: the same path must not mean the same content."""
    model = _model(tmp_path / "m", b"a" * 100)
    first = identity_digest(model)
    assert identity_digest(model) == first  # stable
    (model / "model.safetensors").write_bytes(b"b" * 100)  # small file: its hash changes
    assert identity_digest(model) != first
    (model / "config.json").write_text('{"hidden_size": 9}')
    assert path_identity(model)["config.json"][1] != path_identity(_model(tmp_path / "n", b"b" * 100))["config.json"][1]


def test_a_large_weight_file_is_hashed_once_per_mtime(tmp_path, monkeypatch):
    """The brief's rule: weights by SHA-256, computed once and cached by size + mtime."""
    import hashlib
    import json

    monkeypatch.setenv("OPCD_CACHE", str(tmp_path / "cache"))
    weights = b"\1" * (SMALL_FILE + 1)
    model = _model(tmp_path / "m", weights)
    first = path_identity(model)
    assert first["model.safetensors"] == [SMALL_FILE + 1, hashlib.sha256(weights).hexdigest()]
    (entry,) = (tmp_path / "cache" / "file-hashes").iterdir()
    assert json.loads(entry.read_text())["sha256"] == hashlib.sha256(weights).hexdigest()
    # same size, other bytes, other mtime (a copy over it): hashed again, another identity
    (model / "model.safetensors").write_bytes(b"\2" * (SMALL_FILE + 1))
    stat = (model / "model.safetensors").stat()
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert path_identity(model) != first
    # the old bytes copied back (a new mtime): the old identity again
    (model / "model.safetensors").write_bytes(weights)
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    assert path_identity(model) == first
    # the cache answers without reading the file: a cached entry for this stamp is used as it is
    cached = json.loads(entry.read_text())
    entry.write_text(json.dumps({**cached, "sha256": "f" * 64}))
    assert path_identity(model)["model.safetensors"] == [SMALL_FILE + 1, "f" * 64]


def test_a_hub_id_is_itself_and_checkpoints_are_their_checksums(tmp_path):
    assert path_identity("Qwen/Qwen3-8B") == {"name": "Qwen/Qwen3-8B"}
    for step, weights in ((2, "x"), (4, "y")):
        save_checkpoint(tmp_path, step, lambda f, w=weights: (f / "weights").mkdir() or
                        (f / "weights" / "shard.distcp").write_text(w) and None, {"step": step})
    two, four = path_identity(step_dir(tmp_path, 2)), path_identity(step_dir(tmp_path, 4))
    assert set(two) == {"checkpoint"} and two != four
    # `opcd export` adds model/ to a sharded checkpoint's checksums: the same weights, the same identity
    (step_dir(tmp_path, 2) / "model").mkdir()
    (step_dir(tmp_path, 2) / "model" / "config.json").write_text("{}")
    add_files(step_dir(tmp_path, 2), "model")
    assert path_identity(step_dir(tmp_path, 2)) == two
