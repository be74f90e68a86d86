"""Two Ray nodes on one machine, each started with `ray start` from a folder of its own (a Ray worker's
working folder is its node's, measured: so a relative path names a different place on each node),
2 CPUs each, and a driver in a third folder: the driver's environment reaches every worker (secrets
not through Ray's logs), a 2-rank run with a relative runs folder writes ONE run folder and resumes
from it, and the loss of a node mid-step ends the run with one line naming the node and the last
intact checkpoint.

The nodes are started without `--block` (measured: with it, the head's GCS died as soon as a second
node joined on this machine) as leaders of their own sessions, and stopped by killing those sessions'
processes: `ray stop` would stop every Ray instance on the machine, other runs' included.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray

from opcd.errors import WorkerError
from opcd.workers.group import WorkerGroup
from opcd.workers.shared_storage import check_shared_storage
from tests.test_faults_on_cpu import _session, _wait_session_gone
from tests.workers.test_placement import one_step_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PLAIN = ("OPCD_CLUSTER_PROBE", "plain-7c1e")
SECRET = ("HF_TOKEN", "hf_secret_93d0a")
RAY = str(Path(sys.executable).parent / "ray")


class Nodes:
    def __init__(self, address: str, folders: dict[str, Path], sessions: list[int], temp_dir: Path):
        self.address, self.folders, self.sessions, self.temp_dir = address, folders, sessions, temp_dir

    def raylet_of_second_node(self) -> int:
        return next(pid for pid, cmd in _session(self.sessions[1]).items() if "raylet/raylet" in cmd)

    def second_node_id(self) -> str:
        """The Ray node id of the second node (both nodes share an IP: told apart by the raylet's socket)."""
        raylet = _session(self.sessions[1])[self.raylet_of_second_node()]
        ray.init(address=self.address)
        try:
            found = [node["NodeID"] for node in ray.nodes()
                     if node["Alive"] and f"--raylet_socket_name={node['RayletSocketName']} " in raylet + " "]
        finally:
            ray.shutdown()
        assert len(found) == 1, (raylet, ray.nodes())
        return found[0]


def _ray_start(args: list[str], cwd: Path, env: dict, log: Path) -> int:
    """Run `ray start ARGS` from `cwd` as a session leader; -> the session id its daemons stay in."""
    with open(log, "w") as out:
        proc = subprocess.Popen([RAY, "start", *args, "--num-cpus=2", "--disable-usage-stats"], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.wait(timeout=180) == 0, log.read_text()[-2000:]
    return proc.pid


@pytest.fixture
def nodes(tmp_path, monkeypatch):
    """A head and a second node started from different folders; the test runs in a third one."""
    assert not ray.is_initialized()
    folders = {name: tmp_path / name for name in ("head", "node2", "driver")}
    for folder in folders.values():
        folder.mkdir()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # no token to hand around between local nodes
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    env = dict(os.environ)
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    temp_dir = Path(tempfile.mkdtemp(prefix="opcd-ray-", dir="/tmp"))  # short: Ray's socket paths are limited
    sessions: list[int] = []
    try:
        sessions.append(_ray_start(["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp_dir}"],
                                   folders["head"], env, tmp_path / "head.log"))
        address = f"{ray.util.get_node_ip_address()}:{port}"
        sessions.append(_ray_start([f"--address={address}"], folders["node2"], env, tmp_path / "node2.log"))
        monkeypatch.chdir(folders["driver"])
        ray.init(address=address)
        deadline = time.monotonic() + 120
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.monotonic() < deadline, "the second node did not join"
            time.sleep(0.5)
        ray.shutdown()  # each test connects itself (run_distill does)
        yield Nodes(address, folders, sessions, temp_dir)
    finally:
        ray.shutdown()
        for sid in sessions:
            for pid in _session(sid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for sid in sessions:
            assert _wait_session_gone(sid) == {}, "processes of a test's Ray node outlived it"
        shutil.rmtree(temp_dir, ignore_errors=True)


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

    logs = [p for p in nodes.temp_dir.rglob("*") if p.is_file() and not p.is_socket()]
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
        os.kill(nodes.raylet_of_second_node(), signal.SIGKILL)
        killed["at"] = time.monotonic()

    lost = nodes.second_node_id()
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
    assert re.fullmatch(r"(student|teacher) worker rank [01] on node \S+ \(.+, Ray node " + lost[:8] + r"\) died during "
                        r"\w+: (its node left the Ray cluster|its process.* exited unexpectedly|it cannot be reached).*"
                        r"; last intact checkpoint: " + re.escape(str(run_dir)) + r"/global_step_\d+ "
                        r"\(run the same command to resume\)", line), line
