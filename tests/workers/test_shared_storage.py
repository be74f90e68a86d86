"""The run folder's shared-storage verdict (opcd/workers/shared_storage.py); the check itself runs on two
Ray nodes in tests/workers/test_cluster_on_cpu.py."""

from pathlib import Path

from opcd.workers.shared_storage import unshared


def test_every_rank_reading_the_token_passes():
    assert unshared(["t0k", "t0k"], "t0k", ["10.0.0.1 (a)", "10.0.0.2 (b)"], Path("/runs/x")) is None


def test_a_node_that_does_not_see_the_marker_is_named():
    """A missing marker (None) or an old one left on a node's local disk both fail, naming that node."""
    for seen in (None, "old-token"):
        line = unshared(["t0k", seen], "t0k", ["10.0.0.1 (a)", "10.0.0.2 (b)"], Path("/runs/x"))
        assert line == ("trainer.runs_dir: the run folder /runs/x is not on storage shared by every node: node "
                        "10.0.0.2 (b) does not see the marker file the driver wrote there; put trainer.runs_dir on a "
                        "shared file system (NFS, Lustre, ...) mounted at the same path on every node")
