"""Two Ray nodes on one machine, each started from a folder of its own (a Ray worker's working folder is
its node's, measured: so a relative path names a different place on each node), 2 CPUs each, and a
driver in a third folder: the driver's environment reaches every worker (secrets not through Ray's
logs), a 2-rank run with a relative runs folder writes ONE run folder and resumes from it, and the
loss of a node mid-step ends the run with one line naming the node and the last intact checkpoint.

The nodes are started in-process by ray.cluster_utils, each from its own folder, as
tests/workers/test_two_nodes_on_cpu.py does. Nodes started by `ray start` subprocesses (without
`--block`: with it the head's GCS died when a second node joined) pass these tests in a fresh pytest
process, but not after an earlier local Ray in the same process (it leaves RAY_AUTH_MODE=token and
its token behind, and the new cluster's workers never start), which is how CI runs the suite.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest
import ray

from opcd.errors import WorkerError
from opcd.workers.group import WorkerGroup
from opcd.workers.shared_storage import check_shared_storage
from tests.workers.test_placement import one_step_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PLAIN = ("OPCD_CLUSTER_PROBE", "plain-7c1e")
SECRET = ("HF_TOKEN", "hf_secret_93d0a")


@pytest.fixture
def nodes(tmp_path, monkeypatch):
    """A head and a second node started from different folders; the test runs in a third one."""
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    folders = {name: tmp_path / name for name in ("head", "node2", "driver")}
    for folder in folders.values():
        folder.mkdir()
    # Workers on nodes started from other folders import this test module (Probe) from the repository:
    # the nodes' processes inherit this variable (pytest puts the root on the driver's path alone)
    root = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    monkeypatch.chdir(folders["head"])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    monkeypatch.chdir(folders["node2"])
    second = cluster.add_node(num_cpus=2)
    monkeypatch.chdir(folders["driver"])
    cluster.wait_for_nodes()
    cluster.folders, cluster.second = folders, second
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


class Probe:
    """Reports what a worker process sees."""

    def __init__(self, rank: int, world_size: int, rendezvous=None):
        self.rank = rank

    def seen(self) -> dict:
        return {"plain": os.environ.get(PLAIN[0]), "secret": os.environ.get(SECRET[0]), "cwd": os.getcwd(),
                "node": ray.get_runtime_context().get_node_id()}


def test_the_drivers_environment_reaches_every_worker_on_both_nodes(nodes, monkeypatch):
    """Regression (issue 23 §2): actors got two variables; NCCL_*, HF_*, WANDB_* ... set where the run
    was launched reached the driver alone. Secrets must not land in Ray's log files (Ray logs every
    runtime_env it creates, values included)."""
    monkeypatch.setenv(*PLAIN)
    monkeypatch.setenv(*SECRET)
    ray.init(address=nodes.address)
    group = WorkerGroup("probe", Probe, {}, world_size=2, num_cpus=2)  # 2 CPUs: one rank per node
    seen = group.call(Probe.seen)
    assert len({s["node"] for s in seen}) == 2
    assert {s["cwd"] for s in seen} == {str(nodes.folders["head"]), str(nodes.folders["node2"])}
    assert [(s["plain"], s["secret"]) for s in seen] == [(PLAIN[1], SECRET[1])] * 2
    check_shared_storage(Path.cwd(), [group])  # one machine: every node sees the driver's folder
    group.shutdown()

    logs = [p for p in Path(nodes.head_node.get_session_dir_path()).rglob("*") if p.is_file()]
    found = {value: [p.name for p in logs if value.encode() in p.read_bytes()] for value in (PLAIN[1], SECRET[1])}
    assert found[PLAIN[1]], "the plain variable's value should be in Ray's runtime_env log (the scan must see it)"
    assert found[SECRET[1]] == []


def test_a_two_rank_run_across_nodes_writes_one_run_folder_and_resumes(nodes, tiny_model, capsys):
    """Regression (issue 23 §3): run and checkpoint folders went to the workers as relative paths, so
    each node's rank wrote its shards under its own working folder. The driver resolves them once."""
    from opcd.config import load_config
    from opcd.pipelines.distill import run_distill
    from opcd.runs.checkpoint import latest_checkpoint

    cluster = [f"ray.address={nodes.address}", "ray.nnodes=2", "ray.ranks_per_group=2", "trainer.save_freq=1"]
    assert run_distill(load_config(one_step_overrides(tiny_model, "runs", 2, 4) + cluster))["final_step"] == 2
    run_dir = nodes.folders["driver"] / "runs" / "run"
    step, folder = latest_checkpoint(run_dir)
    assert step == 2 and len(list((folder / "weights").glob("*.distcp"))) == 2
    assert not (nodes.folders["head"] / "runs").exists() and not (nodes.folders["node2"] / "runs").exists()
    assert not list(run_dir.glob(".opcd-shared-storage-check*"))  # the marker is removed
    capsys.readouterr()
    assert run_distill(load_config(one_step_overrides(tiny_model, "runs", 3, 4) + cluster))["final_step"] == 3
    assert f"resumed {run_dir} from step 2" in capsys.readouterr().out
    assert latest_checkpoint(run_dir)[0] == 3


def test_losing_a_node_mid_step_names_the_node_and_the_last_checkpoint(nodes, tiny_model):
    """Issue 23 §7: the second node's raylet is killed (as when a node loses power) after the run's
    first checkpoint; the run must end, within the collective timeout, with one line naming the lost
    rank's node and the last intact checkpoint."""
    from opcd.config import load_config
    from opcd.pipelines.distill import run_distill

    timeout_s = 120
    overrides = one_step_overrides(tiny_model, "runs", 1000, 4) + [
        f"ray.address={nodes.address}", "ray.nnodes=2", "ray.ranks_per_group=2", "trainer.save_freq=1",
        f"ray.collective_timeout_s={timeout_s}"]
    run_dir = nodes.folders["driver"] / "runs" / "run"
    killed = {}

    def kill_second_raylet():
        while not (run_dir / "global_step_1" / "COMPLETE").exists():
            time.sleep(0.05)
        time.sleep(0.5)  # inside the next step
        nodes.second.all_processes["raylet"][0].process.kill()  # SIGKILL
        killed["at"] = time.monotonic()

    threading.Thread(target=kill_second_raylet, daemon=True).start()
    with pytest.raises(WorkerError) as caught:
        run_distill(load_config(overrides))
    seconds = time.monotonic() - killed["at"]
    line = str(caught.value)
    print(f"node loss: the run ended {seconds:.1f} s after the raylet was killed; line: {line}")
    assert seconds < timeout_s
    # The rank on the lost node comes first. What Ray says about it depends on timing: the node's
    # workers may die with their raylet (a dead process, or one it cannot reach), or outlive it until
    # the node misses its health checks (a lost node).
    lost = nodes.second.node_id[:8]
    assert re.fullmatch(r"(student|teacher) worker rank [01] on node \S+ \(.+, Ray node " + lost + r"\) died during "
                        r"\w+: (its node left the Ray cluster|its process.* exited unexpectedly|it cannot be reached).*"
                        r"; last intact checkpoint: " + re.escape(str(run_dir)) + r"/global_step_\d+ "
                        r"\(run the same command to resume\)", line), line
