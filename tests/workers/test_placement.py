"""Placement pools: which bundles each layout asks for (pure), and where Ray really puts the ranks."""

import re

import pytest
import ray

from opcd.errors import ConfigError
from opcd.workers.group import WorkerGroup
from opcd.workers.placement import bundles_needed, gpus_per_actor, make_pools, remove_pools


def test_colocate_is_one_pool_with_a_bundle_per_rank_shared_by_every_group():
    assert bundles_needed({"student": 2, "teacher": 2}, gpus=True, placement="colocate") == {
        "shared": [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]}
    assert bundles_needed({"student": 1, "teacher": 3}, gpus=False, placement="colocate") == {
        "shared": [{"CPU": 2.0}] * 3}


def test_separate_is_one_pool_per_group_with_whole_gpus():
    assert bundles_needed({"student": 2, "teacher": 1}, gpus=True, placement="separate") == {
        "student": [{"CPU": 1.0, "GPU": 1.0}] * 2, "teacher": [{"CPU": 1.0, "GPU": 1.0}]}


def test_unknown_placement_is_refused():
    with pytest.raises(ConfigError, match="ray.placement='spread'"):
        bundles_needed({"student": 1}, gpus=False, placement="spread")


def _where_class():
    """An actor class that reports its placement group (defined in a function so Ray ships it by
    value: the workers cannot import this test module)."""

    class Where:
        def __init__(self, rank: int = 0, world_size: int = 1):
            self.rank = rank

        def where(self) -> str:
            return ray.get_runtime_context().get_placement_group_id()

    return Where


def test_colocated_groups_share_one_pool_rank_by_rank(local_ray):
    pools = make_pools({"student": 2, "teacher": 2}, gpus=False, placement="colocate")
    try:
        assert pools["student"].group.id == pools["teacher"].group.id
        options = [pools["teacher"].actor_options(rank) for rank in (0, 1)]
        assert [o["scheduling_strategy"].placement_group_bundle_index for o in options] == [0, 1]
        assert options[0]["num_gpus"] == 0.0 and options[0]["num_cpus"] == 1.0
        student = WorkerGroup("student", _where_class(), {}, pool=pools["student"])
        teacher = WorkerGroup("teacher", _where_class(), {}, pool=pools["teacher"])
        (s,), (t,) = student.call("where"), teacher.call("where")
        assert s == t == pools["student"].group.id.hex()
        student.shutdown()
        teacher.shutdown()
    finally:
        remove_pools(pools.values())


def test_colocated_groups_share_each_gpu_equally():
    assert gpus_per_actor({"student": 1, "teacher": 1}, gpus=True, placement="colocate") == 0.5
    assert gpus_per_actor({"solver": 1}, gpus=True, placement="colocate") == 1.0
    assert gpus_per_actor({"student": 2, "teacher": 1}, gpus=True, placement="separate") == 1.0
    assert gpus_per_actor({"student": 2, "teacher": 2}, gpus=False, placement="colocate") == 0.0


def test_separate_pools_are_distinct(local_ray):
    pools = make_pools({"student": 1, "teacher": 1}, gpus=False, placement="separate")
    try:
        student = WorkerGroup("student", _where_class(), {}, pool=pools["student"])
        teacher = WorkerGroup("teacher", _where_class(), {}, pool=pools["teacher"])
        (s,), (t,) = student.call("where"), teacher.call("where")
        assert s != t and {s, t} == {pools["student"].group.id.hex(), pools["teacher"].group.id.hex()}
        student.shutdown()
        teacher.shutdown()
    finally:
        remove_pools(pools.values())


def test_pools_larger_than_the_cluster_are_refused_in_one_line(local_ray):
    with pytest.raises(ConfigError) as err:
        make_pools({"student": 4, "teacher": 4}, gpus=True, placement="colocate")
    message = str(err.value)
    assert "\n" not in message and "need 4 GPU" in message and "the cluster has 0 GPU" in message
