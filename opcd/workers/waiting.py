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
the death), so after the first failure the other refs get a short grace period to report too.
Nothing here knows about groups, nodes or messages' wording: `opcd/workers/group.py` turns a
`RankFailure` into the run's one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError, RayTaskError

# Long enough for Ray to report a dead worker's pending task (measured: ~0.05 s locally; a lost node is
# noticed by missed heartbeats, which this does not wait for), short enough not to delay the error line.
GRACE_S = 3.0


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
            more_ready, _ = ray.wait(pending, num_returns=len(pending), timeout=grace_s) if pending else ([], [])
            failures += _collect(more_ready, rank_of, results)
            raise _cause(failures)
    return [results[rank] for rank in range(len(refs))]


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
