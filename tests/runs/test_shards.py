"""The off-policy shard format (opcd/runs/shards.py): round trip, resume after a crash, damaged
files and the one-line errors for every way a shard folder can be wrong."""

from __future__ import annotations

import errno
import hashlib
import json

import pytest
import torch

from opcd.errors import DataError
from opcd.runs import shards as S
from opcd.runs.shards import Shard, ShardReader, ShardWriter, check_keys, tokenizer_fingerprint

HEADER = {"task": "math", "tokenizer": "abc", "topk": 4, "sampling": {"temperature": 0.6}}


def _shard(step: int = 1, loss_mask: bool = True) -> Shard:
    g = torch.Generator().manual_seed(step)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    return Shard(step=step, keys=[f"row:{step * 10 + i}" for i in range(3)],
                 student_prompts=[[1, 2, 3], [4], []], teacher_prompts=[[9, 1, 2, 3], [9, 4], [9, 5, 6, 7]],
                 response_ids=torch.randint(0, 49_000, (3, 5), generator=g), response_mask=mask,
                 loss_mask=(mask & (torch.arange(5) != 1)) if loss_mask else None,
                 topk_ids=torch.randint(0, 49_000, (3, 5, 4), generator=g),
                 topk_logprobs=-torch.rand(3, 5, 4, generator=g) * 5)


def _same(a: Shard, b: Shard) -> None:
    assert a.step == b.step and a.keys == b.keys
    assert a.student_prompts == b.student_prompts and a.teacher_prompts == b.teacher_prompts
    for name in ("response_ids", "response_mask", "loss_mask", "topk_ids", "topk_logprobs"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name


def test_round_trip_keeps_every_field_exactly(tmp_path):
    original = _shard(1)
    original.response_ids[0, 0] = 2**31 - 1  # the largest id int32 holds
    original.topk_logprobs[0, 0, 0] = -1e-30  # float32 bits, not a rounded copy
    bare = Shard(2, ["row:0"], [[1]], [[2, 1]], torch.tensor([[7, 8]]), torch.tensor([[True, False]]))
    writer = ShardWriter(tmp_path, HEADER)
    writer.write(original)
    writer.write(bare)
    reader = ShardReader(tmp_path)
    assert reader.steps == [1, 2] and reader.header == HEADER
    back = reader.read(1)
    _same(back, original)
    assert back.response_ids.dtype == back.topk_ids.dtype == torch.int64
    assert back.response_mask.dtype == back.loss_mask.dtype == torch.bool and back.topk_logprobs.dtype == torch.float32
    assert back.student_prompts == [[1, 2, 3], [4], []]
    back = reader.read(2)
    _same(back, bare)
    assert back.loss_mask is None and back.topk_ids is None and back.topk_logprobs is None


def test_manifest_lists_each_shard_with_its_checksum(tmp_path):
    writer = ShardWriter(tmp_path, HEADER)
    writer.write(_shard(2))
    writer.write(_shard(1, loss_mask=False))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "opcd-offpolicy-shards" and manifest["version"] == 1
    assert manifest["header"] == HEADER
    for entry, step in zip(manifest["shards"], [1, 2]):
        path = tmp_path / f"shard_{step:06d}.safetensors"
        assert entry == {"step": step, "file": path.name, "sequences": 3, "tokens": 10,
                         "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard_000001.safetensors",
                                                          "shard_000002.safetensors"]


def test_ids_beyond_int32_and_malformed_shards_are_refused_before_writing(tmp_path):
    writer = ShardWriter(tmp_path, HEADER)
    big = _shard(1)
    big.topk_ids[0, 0, 0] = 2**31
    with pytest.raises(ValueError, match=r"topk_ids: token ids must lie in \[0, 2\*\*31\)"):
        writer.write(big)
    short = _shard(1)
    short.keys = short.keys[:2]
    with pytest.raises(ValueError, match=r"shard step 1 \(2 keys\): student_prompts has 3 rows"):
        writer.write(short)
    assert writer.done_steps() == set() and not list(tmp_path.glob("shard_*"))


def test_reopening_resumes_and_refuses_other_settings(tmp_path):
    ShardWriter(tmp_path, HEADER).write(_shard(1))
    again = ShardWriter(tmp_path, json.loads(json.dumps(HEADER)))
    assert again.done_steps() == {1}
    with pytest.raises(DataError, match=r"^\S+/manifest.json: written with different settings \(topk: 4 vs 8\); "
                                        r"use another output folder or delete it$"):
        ShardWriter(tmp_path, {**HEADER, "topk": 8})


def test_rewriting_a_step_replaces_it(tmp_path):
    writer = ShardWriter(tmp_path, HEADER)
    writer.write(_shard(1))
    other = _shard(7)
    other.step = 1
    writer.write(other)
    reader = ShardReader(tmp_path)
    assert reader.steps == [1] and len(reader.manifest["shards"]) == 1
    _same(reader.read(1), other)


def test_a_crash_before_the_manifest_update_leaves_only_an_unlisted_file(tmp_path, monkeypatch):
    """Guards the write order: file first, manifest last. A crash in between must not list a shard,
    and temp files from a crash mid-write (shard or manifest) are removed on the next start."""
    writer = ShardWriter(tmp_path, HEADER)
    writer.write(_shard(1))

    def crash(self, manifest):
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "_save_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        writer.write(_shard(2))
    monkeypatch.undo()
    assert (tmp_path / "shard_000002.safetensors").is_file() and writer.done_steps() == {1}
    (tmp_path / "shard_000003.safetensors.tmp123").write_bytes(b"half")
    (tmp_path / ".manifest.json.tmp").write_text('{"half')
    reopened = ShardWriter(tmp_path, HEADER)
    assert reopened.done_steps() == {1} and not list(tmp_path.glob("*.tmp*"))
    assert ShardReader(tmp_path).steps == [1]
    reopened.write(_shard(2))
    _same(ShardReader(tmp_path).read(2), _shard(2))


def test_a_listed_shard_whose_file_is_gone_is_not_done(tmp_path):
    ShardWriter(tmp_path, HEADER).write(_shard(1))
    (tmp_path / "shard_000001.safetensors").unlink()
    writer = ShardWriter(tmp_path, HEADER)
    assert writer.done_steps() == set()
    with pytest.raises(DataError, match=r"shard_000001.safetensors: listed in manifest.json but missing$"):
        ShardReader(tmp_path).read(1)
    writer.write(_shard(1))
    _same(ShardReader(tmp_path).read(1), _shard(1))


@pytest.mark.parametrize("where", ["shard", "manifest"])
def test_out_of_disk_space_is_a_clear_error_and_keeps_the_manifest(tmp_path, monkeypatch, where):
    writer = ShardWriter(tmp_path, HEADER)
    writer.write(_shard(1))
    before = (tmp_path / "manifest.json").read_text()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(S, "save_file" if where == "shard" else "write_text_atomic", full)
    with pytest.raises(DataError, match=r"^no space left on device while writing off-policy shard "
                                        r"\S+/shard_000002\.safetensors \(the earlier shards in \S+ are intact; "
                                        r"free some space") as err:
        writer.write(_shard(2))
    assert "\n" not in str(err.value)
    assert (tmp_path / "manifest.json").read_text() == before and not list(tmp_path.glob("*.tmp*"))
    assert writer.done_steps() == {1}
    monkeypatch.undo()
    writer.write(_shard(2))
    assert ShardReader(tmp_path).steps == [1, 2]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_shard_fails_its_checksum(tmp_path, damage):
    ShardWriter(tmp_path, HEADER).write(_shard(1))
    path = tmp_path / "shard_000001.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    else:
        data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"^\S+/shard_000001.safetensors: checksum mismatch "
                                        r"\(file changed or truncated\)$"):
        ShardReader(tmp_path).read(1)


def test_a_listed_file_that_is_not_safetensors_is_a_one_line_error(tmp_path):
    """The checksum matches (the manifest was rewritten for it), but the content is no shard."""
    ShardWriter(tmp_path, HEADER).write(_shard(1))
    path = tmp_path / "shard_000001.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"^\S+/shard_000001.safetensors: not a valid off-policy shard") as err:
        ShardReader(tmp_path).read(1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("manifest, message", [
    (None, r"^\S+: no off-policy shards \(no manifest.json\); run 'opcd offpolicy generate' first$"),
    ("{not json", r"^\S+/manifest.json: not a JSON manifest"),
    ('["a list"]', r"^\S+/manifest.json: format 'list', expected 'opcd-offpolicy-shards'$"),
    ('{"format": "pickle", "version": 1}', r"^\S+/manifest.json: format 'pickle', expected 'opcd-offpolicy-shards'$"),
    ('{"format": "opcd-offpolicy-shards", "version": 2, "header": {}, "shards": []}',
     r"^\S+/manifest.json: version 2, this opcd reads version 1$"),
    ('{"format": "opcd-offpolicy-shards", "version": 1, "shards": []}',
     r"^\S+/manifest.json: expected a 'header' object and a 'shards' list$"),
    ('{"format": "opcd-offpolicy-shards", "version": 1, "header": {}, '
     '"shards": [{"step": 1, "file": "../../etc/passwd", "sha256": "0"}]}',
     r"^\S+/manifest.json: shards\[0\] = .*etc/passwd.*, expected "),
])
def test_bad_manifests_are_one_line_errors(tmp_path, manifest, message):
    if manifest is not None:
        (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(DataError, match=message) as err:
        ShardReader(tmp_path)
    assert "\n" not in str(err.value)


def test_a_missing_folder_and_a_foreign_manifest(tmp_path):
    with pytest.raises(DataError, match=r"/nowhere: no off-policy shards \(no manifest.json\)"):
        ShardReader(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text('{"format": "opcd-offpolicy-shards", "version": 2}')
    with pytest.raises(DataError, match=r"manifest.json: version 2, this opcd reads version 1$"):
        ShardWriter(tmp_path, HEADER)


def test_check_header_names_the_setting_that_differs(tmp_path):
    ShardWriter(tmp_path, HEADER).write(_shard(1))
    reader = ShardReader(tmp_path)
    reader.check_header({**HEADER, "topk": 99}, ["task", "tokenizer"])  # only the named keys count
    with pytest.raises(DataError, match=rf'^{tmp_path}: shards were generated with tokenizer="abc", '
                                        rf'this run has "xyz"$'):
        reader.check_header({**HEADER, "tokenizer": "xyz"}, ["task", "tokenizer"])
    with pytest.raises(DataError, match=r'generated with sampling=\{"temperature": 0.6\}, this run has null$'):
        reader.check_header({}, ["sampling"])


def test_check_keys_names_the_first_sequence_that_differs():
    shard = _shard(1)  # keys row:10, row:11, row:12
    check_keys(shard, ["row:10", "row:11", "row:12"], "data")
    with pytest.raises(DataError, match=r"^data: shard step 1 does not match the dataset "
                                        r"\(sequence 1: 'row:11' in the shard, 'row:99' now\)$"):
        check_keys(shard, ["row:10", "row:99", "row:12"], "data")
    with pytest.raises(DataError, match=r"^data: shard step 1 does not match the dataset "
                                        r"\(3 sequences in the shard, 2 now\)$"):
        check_keys(shard, ["row:10", "row:11"], "data")


def test_tokenizer_fingerprint_is_stable_and_sensitive(smollm2_dir, smollm2_tokenizer):
    from opcd.models import load_tokenizer

    fresh = load_tokenizer(str(smollm2_dir))  # the shared fixture must not be modified
    fingerprint = tokenizer_fingerprint(smollm2_tokenizer)
    assert len(fingerprint) == 16 and tokenizer_fingerprint(fresh) == fingerprint
    fresh.add_tokens(["<opcd-new-token>"])
    assert tokenizer_fingerprint(fresh) != fingerprint
    other = load_tokenizer(str(smollm2_dir))
    other.add_special_tokens({"pad_token": "<|endoftext|>"})  # same vocab, another special-token role
    assert tokenizer_fingerprint(other) != fingerprint
