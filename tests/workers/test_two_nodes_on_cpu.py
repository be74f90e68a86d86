"""Two Ray nodes on one machine (a head and a second node, each with its own 2 CPUs): a 2-rank run
is placed across both (one rank of each group per node; a colocated bundle needs 2 CPUs, so no node
can hold both) and trains, checkpoints and resumes with gloo between the nodes."""

from __future__ import annotations

import pytest
import ray

from tests.workers.test_placement import RecordingGroup, one_step_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture
def two_nodes():
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_two_rank_run_spans_two_nodes(tmp_path, tiny_model, two_nodes, monkeypatch):
    from opcd.runs.checkpoint import latest_checkpoint
    from opcd.config import load_config
    from opcd.pipelines import distill

    monkeypatch.setattr(distill, "WorkerGroup", RecordingGroup)
    RecordingGroup.built = []
    cluster = [f"ray.address={two_nodes.address}", "ray.nnodes=2", "ray.ranks_per_group=2"]
    assert distill.run_distill(load_config(one_step_overrides(tiny_model, tmp_path, 1, 4) + cluster))["final_step"] == 1
    assert len({node["NodeID"] for node in ray.nodes() if node["Alive"]}) == 2
    for group in RecordingGroup.built:
        assert group["ranks"] == 2 and len(set(group["nodes"])) == 2, group
    step, folder = latest_checkpoint(tmp_path / "run")
    assert step == 1 and len(list((folder / "weights").glob("*.distcp"))) == 2
    assert distill.run_distill(load_config(one_step_overrides(tiny_model, tmp_path, 2, 4) + cluster))["final_step"] == 2


def test_a_local_run_does_not_join_a_cluster_it_finds(two_nodes, monkeypatch):
    """ray.address=null means a Ray of our own, even when the environment names another cluster
    (RAY_ADDRESS, or the address file a `ray start` leaves in /tmp/ray): plain ray.init() would join it."""
    from opcd.workers.group import init_ray

    monkeypatch.setenv("RAY_ADDRESS", two_nodes.address)
    init_ray(None, 2)
    assert len([node for node in ray.nodes() if node["Alive"]]) == 1
