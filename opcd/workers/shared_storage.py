"""Start-up check that a run folder is on storage every node of the run sees, at the same path.

Each rank writes its own checkpoint shards into the run folder and rank 0 reads all of them on a
resume. On a cluster whose nodes each have a local `runs/` folder, a run would train, save "complete"
checkpoints that are scattered over the nodes, and fail (or silently start over) on its first
resume. So before training the driver writes a marker file holding a fresh random token into the run
folder and every rank of the given worker groups reads it back: a rank that finds no marker, or an
old one, stops the run with one line naming its node. The marker is removed afterwards.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from opcd.errors import ConfigError

MARKER = ".opcd-shared-storage-check"


def check_shared_storage(folder: Path, groups) -> None:
    """Every rank of `groups` (WorkerGroups) reads the marker the driver writes into `folder`."""
    token = secrets.token_hex(16)  # fresh, so a marker left behind on some node's local disk cannot pass
    marker = Path(folder) / MARKER
    marker.write_text(token)
    try:
        for group in groups:
            seen = group.call("__ray_call__", _read_marker, str(marker))
            problem = unshared(seen, token, group.nodes, Path(folder))
            if problem:
                raise ConfigError(problem)
    finally:
        marker.unlink(missing_ok=True)


def unshared(seen: list[str | None], token: str, nodes: list[str], folder: Path) -> str | None:
    """The one-line problem when a rank read something other than `token` (rank r ran on nodes[r]), else None."""
    for rank, text in enumerate(seen):
        if text != token:
            node = nodes[rank] if rank < len(nodes) else f"the node of rank {rank}"
            return (f"trainer.runs_dir: the run folder {folder} is not on storage shared by every node: node {node} "
                    f"does not see the marker file the driver wrote there; put trainer.runs_dir on a shared file "
                    f"system (NFS, Lustre, ...) mounted at the same path on every node")
    return None


def _read_marker(worker, path: str) -> str | None:
    """Run inside an actor: the marker's content as this node sees it, None when it cannot be read."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None
