"""Waiting on every rank together (opcd/workers/waiting.py) with real Ray actors on CPU: the first
failure ends the wait even while other ranks block, a dead rank is named before a survivor's error,
and the group's line names rank, node and method."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
import ray

from opcd.errors import WorkerError
from opcd.workers.group import WorkerGroup
from opcd.workers.waiting import RankFailure, gather_ranks

pytestmark = pytest.mark.slow  # ~40 s: a Ray start and actors that die


class Rank:
    """A stand-in for a worker whose ranks wait for each other in collectives. `step(plan)`: rank r
    does plan[r] = (what, after_s): "ok" returns, "block" sleeps (as a rank waits in an all-gather for
    a failed peer), "raise" raises its own error, "peer" raises the error gloo gives a survivor, "die"
    SIGKILLs its process."""

    def __init__(self, rank: int, world_size: int, rendezvous=None):
        self.rank = rank

    def step(self, plan: dict | None = None):
        what, after_s = (plan or {}).get(self.rank, ("ok", 0.0))
        time.sleep(after_s)
        match what:
            case "raise":
                raise ValueError(f"rank {self.rank} is out of memory\nCUDA out of memory. Tried to allocate 2.00 GiB")
            case "peer":
                raise RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [10.0.0.1]:4242: Connection reset by peer")
            case "die":
                os.kill(os.getpid(), signal.SIGKILL)
        return self.rank * 10


def test_results_come_back_in_rank_order(local_ray):
    actors = [ray.remote(Rank).remote(r, 3) for r in range(3)]
    assert gather_ranks([a.step.remote() for a in actors]) == [0, 10, 20]


def test_the_first_error_ends_the_wait_while_another_rank_blocks(local_ray):
    """Regression (issue 22 §3): rank 0 blocked in a collective held the driver until the collective
    timed out (10 h), because results were fetched rank by rank."""
    actors = [ray.remote(Rank).options(num_cpus=0.5).remote(r, 2) for r in range(2)]
    start = time.monotonic()
    with pytest.raises(RankFailure) as caught:
        gather_ranks([a.step.remote({0: ("block", 3600), 1: ("raise", 0)}) for a in actors], grace_s=0.5)
    assert time.monotonic() - start < 20
    assert caught.value.rank == 1 and not caught.value.died and caught.value.consequences == []
    for actor in actors:
        ray.kill(actor)


def test_a_dead_rank_is_the_cause_and_a_survivors_error_its_consequence(local_ray):
    """Regression (issue 24 §3): SIGKILL of rank 1 was reported as rank 0's gloo "Read error". Here the
    survivor's error arrives FIRST (rank 1 dies 0.5 s after rank 0 raised): still rank 1 is the cause."""
    actors = [ray.remote(Rank).options(num_cpus=0.5).remote(r, 2) for r in range(2)]
    with pytest.raises(RankFailure) as caught:
        gather_ranks([a.step.remote({0: ("peer", 0), 1: ("die", 0.5)}) for a in actors])
    assert caught.value.rank == 1 and caught.value.died
    assert [rank for rank, _ in caught.value.consequences] == [0]


def test_the_groups_line_names_rank_node_method_and_the_errors_last_line(local_ray):
    group = WorkerGroup("student", Rank, {}, world_size=2, num_cpus=0.5)
    node_id = ray.get_runtime_context().get_node_id()[:8]
    assert group.nodes == [f"{ray.util.get_node_ip_address()} ({socket.gethostname()}, Ray node {node_id})"] * 2
    with pytest.raises(WorkerError) as caught:
        group.call(Rank.step, {1: ("raise", 0)})
    assert str(caught.value) == (f"student worker rank 1 on node {group.nodes[1]} failed in step: ValueError: "
                                 f"CUDA out of memory. Tried to allocate 2.00 GiB")
    group.shutdown()


def test_the_groups_line_puts_the_dead_rank_first(local_ray):
    group = WorkerGroup("student", Rank, {}, world_size=2, num_cpus=0.5)
    with pytest.raises(WorkerError) as caught:
        group.call(Rank.step, {0: ("peer", 0), 1: ("die", 0.5)})
    line = str(caught.value)
    assert line.startswith(f"student worker rank 1 on node {group.nodes[1]} died during step: its process (pid "), line
    assert line.endswith("; rank 0 failed in step as a consequence: RuntimeError: [../gloo/transport/tcp/pair.cc:537] "
                         "Read error [10.0.0.1]:4242: Connection reset by peer"), line
    group.shutdown()
