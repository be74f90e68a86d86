"""Await one call's results from every rank of a worker group together, and stop at the first failure.

Fetching results rank by rank (`ray.get` on rank 0, then rank 1, ...) hangs when a later rank fails
while rank 0 waits in a collective for it: the driver then learns nothing until the collective times
out. `gather_ranks` waits on all the ranks' object refs at once (`ray.wait`) and raises a
`RankFailure` as soon as any of them fails, naming the rank that CAUSED the failure:

* a rank whose process is gone (`RayActorError`: killed, out of memory, crashed, its node left) is
  the cause; a survivor's error at about the same moment (gloo "Read error", an NCCL abort) is
  reported after it, as a consequence;
* otherwise the first rank whose call raised is the cause (a rank that raises leaves the others
  waiting in their next collective: they are not waited for).

A survivor's symptom often arrives before the dead rank's notice (both come within milliseconds of
a process's death; a lost node's notice comes only after it missed Ray's health checks), so after
the first failure the other refs get a grace period to report too.
Nothing here knows about groups, nodes or messages' wording: `opcd/workers/group.py` turns a
`RankFailure` into the run's one line.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError, RayTaskError

# Long enough for Ray to report a dead worker's pending task (measured: ~0.05 s locally), short enough
# not to delay the error line.
GRACE_S = 3.0
# When a survivor's error says its peer is gone but no rank's death was reported yet, the peer's node
# may be gone: Ray reports that only once the node misses its health checks (about 15-30 s with Ray's
# defaults, measured in tests/workers/test_cluster_on_cpu.py), so wait that long for the notice.
PEER_LOST_GRACE_S = 60.0
PEER_LOST = re.compile(r"Read error|Connection (reset|closed) by peer|Socket closed|Broken pipe|remote process exit"
                       r"|communicator was aborted|NCCL error", re.IGNORECASE)


@dataclass
class RankFailure(Exception):
    """Rank `rank`'s call failed: `error` is the Ray exception (a RayActorError when the rank's process
    died, else a RayTaskError). `consequences`: other ranks' failures seen during the grace period."""

    rank: int
    error: Exception
    consequences: list[tuple[int, Exception]]

    @property
    def died(self) -> bool:
        return isinstance(self.error, RayActorError)

    def __str__(self) -> str:
        return f"rank {self.rank} failed: {type(self.error).__name__}"


def gather_ranks(refs: list, grace_s: float = GRACE_S) -> list:
    """Each rank's result (rank order), or a RankFailure at the first failure of any rank."""
    rank_of = {ref: rank for rank, ref in enumerate(refs)}
    results: dict[int, object] = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        failures = _collect(ready, rank_of, results)
        if failures:
            failures += _settle(pending, rank_of, results, grace_s, failures)
            raise _cause(failures)
    return [results[rank] for rank in range(len(refs))]


def _settle(pending: list, rank_of: dict, results: dict, grace_s: float, failures: list) -> list[tuple[int, Exception]]:
    """The other ranks' failures within the grace period (longer while a survivor says its peer is gone
    and no death is known yet); stops early once every rank has answered or a death is known."""
    found: list[tuple[int, Exception]] = []
    deadline = time.monotonic() + grace_s
    peer_lost_deadline = time.monotonic() + max(grace_s, PEER_LOST_GRACE_S)
    while pending:
        known = failures + found
        if any(isinstance(error, RayActorError) for _, error in known):
            wait_until = deadline  # the cause is known: collect consequences for the short grace only
        elif any(PEER_LOST.search(str(error)) for _, error in known):
            wait_until = peer_lost_deadline
        else:
            wait_until = deadline
        left = wait_until - time.monotonic()
        if left <= 0:
            break
        ready, pending = ray.wait(pending, num_returns=1, timeout=min(left, 1.0))
        found += _collect(ready, rank_of, results)
    return found


def _collect(ready: list, rank_of: dict, results: dict) -> list[tuple[int, Exception]]:
    """Store the ready refs' results; -> the (rank, error) of those that failed, in rank order."""
    failures = []
    for ref in ready:
        try:
            results[rank_of[ref]] = ray.get(ref)
        except (RayTaskError, RayActorError) as exc:
            failures.append((rank_of[ref], exc))
    return sorted(failures, key=lambda failure: failure[0])


def _cause(failures: list[tuple[int, Exception]]) -> RankFailure:
    """The dead rank first (the others' errors follow from it), else the first rank that raised."""
    dead = [f for f in failures if isinstance(f[1], RayActorError)]
    rank, error = (dead or failures)[0]
    return RankFailure(rank, error, [f for f in failures if f[0] != rank])
