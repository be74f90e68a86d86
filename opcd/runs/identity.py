"""Content identity of the files behind a model path (and other inputs), to key caches and check resumes.

A path names files, not their content: a model folder copied over in place keeps its path, and a cache
keyed by the path alone returns the old model's scores. The identity of a local folder lists every file
with its size and SHA-256. A large (weight) file's SHA-256 is computed once and cached by path, size and
modification time (hashing tens of GB on every start would cost minutes); a copy or rewrite changes the
modification time, so it is hashed again, and the same bytes copied back give the same identity. A checkpoint folder's identity is
the hash of its checksums file, which already holds the SHA-256 of every file in it (less a later
export of sharded weights). A hub id is itself.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from opcd.runs.checkpoint import CHECKSUMS, COMPLETE, MODEL, WEIGHTS

SMALL_FILE = 1 << 20  # files up to this size are hashed every time; larger ones (weights) once per mtime


def path_identity(name_or_path: str | Path) -> dict:
    """What the content behind `name_or_path` is, as a JSON-able mapping (equal mappings, equal content)."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return {"name": str(name_or_path)}  # a hub id, or a file that is not there (its loader says so)
    if path.is_dir() and (path / COMPLETE).is_file() and (path / CHECKSUMS).is_file():
        lines = (path / CHECKSUMS).read_text(encoding="ascii", errors="replace").splitlines()
        if any(line.partition("  ")[2].startswith(f"{WEIGHTS}/") for line in lines):
            # sharded: model/ is an export of weights/ added later (`opcd export`); the same content
            lines = [line for line in lines if not line.partition("  ")[2].startswith(f"{MODEL}/")]
        return {"checkpoint": hashlib.sha256("\n".join(lines).encode()).hexdigest()}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)
    return {str(p.relative_to(path) if p != path else p.name): _file_identity(p) for p in files}


def identity_digest(*names_or_paths: str | Path) -> str:
    """A short digest of the identities of several paths, for a cache key."""
    text = json.dumps([path_identity(p) for p in names_or_paths], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_identity(path: Path) -> list:
    stat = path.stat()
    if stat.st_size <= SMALL_FILE:
        return [stat.st_size, hashlib.sha256(path.read_bytes()).hexdigest()]
    return [stat.st_size, _cached_sha256(path, stat)]


def _cached_sha256(path: Path, stat) -> str:
    """SHA-256 of a large file, computed once per (path, size, mtime) and kept under the opcd cache
    (OPCD_CACHE, ~/.cache/opcd): a weight file of 16 GB hashes in about a minute, and a start that
    finds it unchanged pays nothing. A rewrite changes the mtime, so the hash is computed again."""
    from opcd.models import cache_dir
    from opcd.runs.checkpoint import file_sha256, write_text_atomic

    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    entry = cache_dir() / "file-hashes" / f"{key}.json"
    stamp = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        cached = json.loads(entry.read_text())
        if {k: cached.get(k) for k in stamp} == stamp and isinstance(cached.get("sha256"), str):
            return cached["sha256"]
    except (OSError, ValueError):
        pass  # absent or damaged: computed again
    digest = file_sha256(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(entry, json.dumps({**stamp, "sha256": digest}))
    except OSError:
        pass  # an unwritable cache only costs the hash again next time
    return digest
