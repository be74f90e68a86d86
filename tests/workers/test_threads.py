"""A rank's default torch threads: the node's cores shared by its group's ranks on that node."""

from opcd.workers.base import default_threads
from opcd.workers.group import ranks_on_each_node
from opcd.workers.placement import Pool


def test_the_cores_are_shared_by_the_groups_ranks_on_a_node():
    assert default_threads(cores=128, ranks_on_node=8) == 16
    assert default_threads(cores=2, ranks_on_node=1) == 2  # the CPU demo: one rank, every core
    assert default_threads(cores=2, ranks_on_node=4) == 1  # never zero


def test_ranks_per_node_come_from_the_pools_placement():
    # 16 ranks on two nodes of 8 GPUs, bundles interleaved by Ray and taken node by node
    nodes = tuple(["a", "b"] * 8)
    pool = Pool(group=None, gpus_per_actor=0.5, order=tuple(range(0, 16, 2)) + tuple(range(1, 16, 2)), nodes=nodes)
    assert ranks_on_each_node(16, pool) == [8] * 16
    uneven = Pool(group=None, gpus_per_actor=1.0, order=(0, 1, 2), nodes=("a", "a", "b"))
    assert ranks_on_each_node(3, uneven) == [2, 2, 1]
    assert ranks_on_each_node(2) == [2, 2]  # no pool: one local node
