"""The on-disk format of off-policy data: one safetensors file per training step plus a JSON
manifest. No pickle: tensors are safetensors, everything else JSON.

    <dir>/manifest.json
        {"format": "opcd-offpolicy-shards", "version": 1,
         "header": {...the settings the data was generated with...},
         "shards": [{"step": 1, "file": "shard_000001.safetensors", "sequences": 8, "tokens": 1234,
                     "sha256": "..."}, ...]}
    <dir>/shard_000001.safetensors
        student_prompts, teacher_prompts   int32, ragged prompts concatenated
        student_offsets, teacher_offsets   int64 [B + 1], offsets into them
        response_ids                       int32 [B, T]
        response_mask                      uint8 [B, T]
        loss_mask                          uint8 [B, T]     (only when given)
        topk_ids                           int32 [B, T, K]   (optional)
        topk_logprobs                      float32 [B, T, K] (optional)
        metadata: {"step": "<step>", "keys": JSON list of the B sequence ids}

A shard is written to a temporary name, fsynced and renamed, and only then listed in the manifest
(itself replaced atomically), so a crash leaves at most an unlisted file that the next run
overwrites; the listed shards are always whole. Each listed file's sha256 is checked on read.

    writer = ShardWriter(folder, header)          # reopening continues a folder (same header only)
    for step in range(1, n + 1):
        if step not in writer.done_steps():
            writer.write(Shard(step, keys, ...))
    reader = ShardReader(folder); reader.check_header(header, ["tokenizer", "task"])
    shard = reader.read(step); check_keys(shard, dataset_keys, str(reader.folder))
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from opcd.runs.checkpoint import write_text_atomic
from opcd.errors import DataError

FORMAT = "opcd-offpolicy-shards"
VERSION = 1
MANIFEST = "manifest.json"
_INT32_LIMIT = 2**31


@dataclass
class Shard:
    step: int  # 1-based training step
    keys: list[str]  # one id per sequence ("row:17", "game:<seed>:turn:<i>"), checked against the dataset
    student_prompts: list[list[int]]  # B token-id lists, ragged
    teacher_prompts: list[list[int]]  # B token-id lists, ragged
    response_ids: torch.Tensor  # [B, T] int64, right-padded
    response_mask: torch.Tensor  # [B, T] bool: real tokens
    loss_mask: torch.Tensor | None = None  # [B, T] bool: tokens trained on; None = response_mask
    topk_ids: torch.Tensor | None = None  # [B, T, K] int64: the teacher's top-k ids
    topk_logprobs: torch.Tensor | None = None  # [B, T, K] float32: the teacher's log-probs there


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what gives token ids their meaning: the vocabulary (with added tokens and their
    flags) and the special tokens with their roles. Independent of the tokenizer class, so a slow and
    a fast load of the same files agree; merges are not hashed (a prompt tokenized differently is
    caught by comparing the stored prompts with the dataset's)."""
    added = {int(i): {"content": str(t), **{f: getattr(t, f, None) for f in
                                              ("special", "normalized", "lstrip", "rstrip", "single_word")}}
             for i, t in tokenizer.added_tokens_decoder.items()}
    parts = {"vocab": sorted(tokenizer.get_vocab().items()),
             "added": sorted(added.items()),
             "roles": sorted((role, str(value)) for role, value in tokenizer.special_tokens_map.items()),
             "special_ids": sorted(tokenizer.all_special_ids)}
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:16]


def check_keys(shard: Shard, expected_keys: list[str], source: str) -> None:
    """The shard must hold the sequences the dataset gives for its step, in the same order."""
    if list(shard.keys) == list(expected_keys):
        return
    for i, (stored, now) in enumerate(zip(shard.keys, expected_keys)):
        if stored != now:
            raise DataError(f"{source}: shard step {shard.step} does not match the dataset "
                            f"(sequence {i}: {stored!r} in the shard, {now!r} now)")
    raise DataError(f"{source}: shard step {shard.step} does not match the dataset "
                    f"({len(shard.keys)} sequences in the shard, {len(expected_keys)} now)")


# ---------------------------------------------------------------------------------------------- encoding

def _ids32(ids: torch.Tensor, name: str) -> torch.Tensor:
    if ids.numel() and (int(ids.max()) >= _INT32_LIMIT or int(ids.min()) < 0):
        raise ValueError(f"{name}: token ids must lie in [0, 2**31) to be stored as int32, "
                         f"got [{int(ids.min())}, {int(ids.max())}]")
    return ids.to(torch.int32).contiguous()


def _ragged(rows: list[list[int]], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])  # [B + 1]
    flat = torch.tensor([t for r in rows for t in r], dtype=torch.int64)
    return _ids32(flat, name), offsets


def _unragged(flat: torch.Tensor, offsets: torch.Tensor) -> list[list[int]]:
    values, bounds = flat.tolist(), offsets.tolist()
    return [values[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]


def _check_shapes(shard: Shard) -> None:
    """A shard that does not hold together is a bug in the caller: refuse it before it reaches disk."""
    b = len(shard.keys)
    bt = tuple(shard.response_ids.shape)
    problems = [f"{name} has {len(rows)} rows" for name, rows in
                (("student_prompts", shard.student_prompts), ("teacher_prompts", shard.teacher_prompts))
                if len(rows) != b]
    if len(bt) != 2 or bt[0] != b:
        problems.append(f"response_ids has shape {list(bt)}, expected [{b}, T]")
    for name in ("response_mask", "loss_mask"):
        mask = getattr(shard, name)
        if mask is not None and tuple(mask.shape) != bt:
            problems.append(f"{name} has shape {list(mask.shape)}, expected {list(bt)}")
    topk = [(n, t) for n in ("topk_ids", "topk_logprobs") if (t := getattr(shard, n)) is not None]
    for name, tensor in topk:
        if tensor.dim() != 3 or tuple(tensor.shape[:2]) != bt:
            problems.append(f"{name} has shape {list(tensor.shape)}, expected {list(bt)} + [K]")
    if len(topk) == 2 and topk[0][1].shape != topk[1][1].shape:
        problems.append("topk_ids and topk_logprobs differ in shape")
    if problems:
        raise ValueError(f"shard step {shard.step} ({b} keys): " + "; ".join(problems))


def _encode(shard: Shard) -> dict[str, torch.Tensor]:
    _check_shapes(shard)
    student, student_offsets = _ragged(shard.student_prompts, "student_prompts")
    teacher, teacher_offsets = _ragged(shard.teacher_prompts, "teacher_prompts")
    tensors = {"student_prompts": student, "student_offsets": student_offsets, "teacher_prompts": teacher,
               "teacher_offsets": teacher_offsets, "response_ids": _ids32(shard.response_ids, "response_ids"),
               "response_mask": shard.response_mask.to(torch.uint8).contiguous()}
    if shard.loss_mask is not None:
        tensors["loss_mask"] = shard.loss_mask.to(torch.uint8).contiguous()
    if shard.topk_ids is not None:
        tensors["topk_ids"] = _ids32(shard.topk_ids, "topk_ids")
    if shard.topk_logprobs is not None:
        tensors["topk_logprobs"] = shard.topk_logprobs.to(torch.float32).contiguous()
    return tensors


def _decode(tensors: dict[str, torch.Tensor], step: int, keys: list[str]) -> Shard:
    def optional(name, dtype):
        return tensors[name].to(dtype) if name in tensors else None

    return Shard(step=step, keys=keys,
                 student_prompts=_unragged(tensors["student_prompts"], tensors["student_offsets"]),
                 teacher_prompts=_unragged(tensors["teacher_prompts"], tensors["teacher_offsets"]),
                 response_ids=tensors["response_ids"].to(torch.int64),
                 response_mask=tensors["response_mask"].to(torch.bool),
                 loss_mask=optional("loss_mask", torch.bool), topk_ids=optional("topk_ids", torch.int64),
                 topk_logprobs=optional("topk_logprobs", torch.float32))


# ---------------------------------------------------------------------------------------------- files

def _shard_name(step: int) -> str:
    return f"shard_{step:06d}.safetensors"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (the new name survives a power cut)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not folder.is_dir() or not path.is_file():
        raise DataError(f"{folder}: no off-policy shards (no {MANIFEST}); run 'opcd offpolicy generate' first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: absurd nesting
        raise DataError(f"{path}: not a JSON manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path}: format {found!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise DataError(f"{path}: version {manifest.get('version')!r}, this opcd reads version {VERSION}")
    if not isinstance(manifest.get("shards"), list) or not isinstance(manifest.get("header"), dict):
        raise DataError(f"{path}: expected a 'header' object and a 'shards' list")
    for i, entry in enumerate(manifest["shards"]):
        _check_entry(path, i, entry)
    if len({e["step"] for e in manifest["shards"]}) != len(manifest["shards"]):
        raise DataError(f"{path}: a step is listed twice in 'shards'")
    return manifest


def _check_entry(path: Path, i: int, entry) -> None:
    """Entries name files inside the folder only (no paths), with an integer step and a sha256."""
    ok = (isinstance(entry, dict) and type(entry.get("step")) is int and entry["step"] >= 1
          and entry.get("file") == _shard_name(entry["step"]) and isinstance(entry.get("sha256"), str))
    if not ok:
        raise DataError(f"{path}: shards[{i}] = {json.dumps(entry)[:200]}, expected "
                        f'{{"step": N, "file": "shard_00000N.safetensors", "sha256": "...", ...}}')


def _first_difference(old: dict, new: dict) -> str:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {json.dumps(old.get(key))} vs {json.dumps(new.get(key))}"
    return "?"


class ShardWriter:
    """Writes one shard per step into `folder`; reopening a folder continues it (same header only)."""

    def __init__(self, folder: str | Path, header: dict):
        self.folder = Path(folder)
        self.header = json.loads(json.dumps(header))  # as it will read back (tuples become lists)
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.folder.glob("*.tmp*"):  # a crash mid-write (shard or manifest)
            if leftover.is_file():
                leftover.unlink()
        if (self.folder / MANIFEST).is_file():
            self.manifest = _read_manifest(self.folder)
            if self.manifest["header"] != self.header:
                raise DataError(f"{self.folder / MANIFEST}: written with different settings "
                                f"({_first_difference(self.manifest['header'], self.header)}); use another "
                                f"output folder or delete it")
        else:
            self.manifest = {"format": FORMAT, "version": VERSION, "header": self.header, "shards": []}
            self._guard_disk(f"off-policy manifest {self.folder / MANIFEST}",
                             lambda: self._save_manifest(self.manifest))

    def done_steps(self) -> set[int]:
        """Steps listed in the manifest whose file is there (an unlisted file is a crash leftover)."""
        return {entry["step"] for entry in self.manifest["shards"] if (self.folder / entry["file"]).is_file()}

    def write(self, shard: Shard) -> Path:
        """Publish `shard` (replacing an earlier one for its step): file first, manifest last."""
        tensors = _encode(shard)  # ValueError for a malformed shard, before anything touches the disk
        name = _shard_name(shard.step)
        final = self.folder / name
        entry = {"step": shard.step, "file": name, "sequences": len(shard.keys),
                 "tokens": int(shard.response_mask.sum())}

        def publish():
            temp = self.folder / f"{name}.tmp{os.getpid()}"
            try:
                save_file(tensors, str(temp), metadata={"step": str(shard.step), "keys": json.dumps(shard.keys)})
                with open(temp, "rb") as fh:
                    os.fsync(fh.fileno())
                entry["sha256"] = _sha256(temp)
                os.replace(temp, final)
            finally:
                temp.unlink(missing_ok=True)
            _fsync_dir(self.folder)
            others = [e for e in self.manifest["shards"] if e["step"] != shard.step]
            manifest = {**self.manifest, "shards": sorted(others + [entry], key=lambda e: e["step"])}
            self._save_manifest(manifest)
            self.manifest = manifest  # only once it is on disk

        self._guard_disk(f"off-policy shard {final}", publish)
        return final

    def _guard_disk(self, what: str, action) -> None:
        try:
            action()
        except OSError as exc:
            for leftover in self.folder.glob("*.tmp*"):
                leftover.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise DataError(f"no space left on device while writing {what} (the earlier shards in "
                                f"{self.folder} are intact; free some space and run again to continue)") from None
            raise

    def _save_manifest(self, manifest: dict) -> None:
        write_text_atomic(self.folder / MANIFEST, json.dumps(manifest, indent=1))
        _fsync_dir(self.folder)


class ShardReader:
    """Reads a shard folder; every listed file is checked against its sha256 when read."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = _read_manifest(self.folder)
        self.entries = {e["step"]: e for e in self.manifest["shards"]}

    @property
    def header(self) -> dict:
        return self.manifest["header"]

    @property
    def steps(self) -> list[int]:
        return sorted(self.entries)

    def read(self, step: int) -> Shard:
        entry = self.entries.get(step)
        if entry is None:
            raise DataError(f"{self.folder}: no shard for step {step} (the manifest lists {len(self.entries)} "
                            f"steps: {_span(self.steps)})")
        path = self.folder / entry["file"]
        if not path.is_file():
            raise DataError(f"{path}: listed in {MANIFEST} but missing")
        if _sha256(path) != entry["sha256"]:
            raise DataError(f"{path}: checksum mismatch (file changed or truncated)")
        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = fh.metadata() or {}
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
            keys = json.loads(metadata["keys"])
            stored_step = int(metadata["step"])
            shard = _decode(tensors, step, keys)
        except (SafetensorError, KeyError, ValueError, OSError) as exc:
            raise DataError(f"{path}: not a valid off-policy shard ({type(exc).__name__}: {exc})") from None
        if stored_step != step:
            raise DataError(f"{path}: holds step {stored_step}, but {MANIFEST} lists it for step {step}")
        return shard

    def check_header(self, expected: dict, keys: list[str]) -> None:
        """The data must have been generated with the same values of `keys` as this run has."""
        expected = json.loads(json.dumps(expected))
        for key in keys:
            if self.header.get(key) != expected.get(key):
                raise DataError(f"{self.folder}: shards were generated with {key}={json.dumps(self.header.get(key))}, "
                                f"this run has {json.dumps(expected.get(key))}")


def _span(steps: list[int]) -> str:
    if not steps:
        return "none"
    return f"{steps[0]}..{steps[-1]}" if len(steps) > 1 else str(steps[0])
