"""Wait until a Ray cluster has N live nodes: the cluster start scripts (scripts/slurm/opcd.sbatch,
scripts/ssh/two_hosts.sh) run it on the head before the launcher, because opcd sizes its worker pools
from the cluster's resources at start-up and a node still joining would make them too small.

    python tools/ray_wait_nodes.py --nodes 2 --timeout-s 600     # joins the cluster at ray.address=auto

Prints one line when the nodes are there (exit 0), or one line naming how many joined after the timeout
(exit 1). The head itself may still be starting: connection failures are retried until the timeout.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable


def wait_for_nodes(count_alive: Callable[[], int], wanted: int, timeout_s: float, poll_s: float = 5.0,
                   clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> int:
    """Call `count_alive` every `poll_s` until it reports `wanted` nodes; the last count when the time is up
    (a ConnectionError from `count_alive`, a head not up yet, counts as 0)."""
    deadline = clock() + timeout_s
    while True:
        try:
            alive = count_alive()
        except ConnectionError:
            alive = 0
        if alive >= wanted or clock() >= deadline:
            return alive
        sleep(poll_s)


def _ray_counter(address: str) -> Callable[[], int]:
    import ray

    def count() -> int:
        if not ray.is_initialized():
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        return sum(1 for node in ray.nodes() if node.get("Alive"))
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, required=True, help="live nodes to wait for")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="give up after this many seconds")
    parser.add_argument("--address", default="auto", help="the cluster (default: the one started on this node)")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.timeout_s <= 0:
        parser.error(f"--nodes {args.nodes} --timeout-s {args.timeout_s}: expected --nodes >= 1 and --timeout-s > 0")
    alive = wait_for_nodes(_ray_counter(args.address), args.nodes, args.timeout_s)
    if alive < args.nodes:
        print(f"ray_wait_nodes: error: {alive} of {args.nodes} nodes joined the Ray cluster at {args.address} "
              f"within {args.timeout_s:.0f} s (see each node's ray_node_setup.sh output)", file=sys.stderr)
        return 1
    print(f"[ray_wait_nodes] {alive} nodes in the Ray cluster at {args.address}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
