"""Benchmark: one training step's data traffic from the driver to N Ray ranks, through the real
`WorkerGroup` and `UpdateBatch`, with synthetic tensors (no model): what the object store holds, what
each rank receives, the driver's seconds, the padding share and the tokens per rank, for the old data
plane (every rank gets the whole batch by value: `WorkerGroup.scatter = False`) and the new one (each
rank's rows put once and sent to that rank alone), measured in the same run.

The batch: `--batch` responses with long-tailed lengths (log-normal, clipped to 1..`--length`), a
support of `--k` ids (int64 on the driver) and teacher log-probs (fp32) at every position, padded to
the longest response as the trainer builds it. Each rank's `update` measures the bytes of the tensors
it was handed. Object-store bytes: the distinct objects the call stores (Ray stores a by-value
argument over its 100 KiB inline limit once per call, a `ray.put` object once). "Real-token bytes":
the support ids (int32) and log-probs (fp32) at real tokens only, the floor any data plane must ship.

`--nodes 2`: two local Ray nodes (`ray.cluster_utils.Cluster`, each with its own raylet and object
store), the ranks placed half on each by opcd's own pools (opcd/workers/placement.py), and the bytes
that cross from the driver's node to the other: what its ranks received (each object a rank pulls is
its own copy there, as in the old path, or its own share in the new one).

Run:  .venv/bin/python benchmarks/dataplane.py                       # 8 ranks, B=64, T=2048, K=32
      .venv/bin/python benchmarks/dataplane.py --ranks 16 --batch 128 --length 4096 --k 64 --json out.json
      .venv/bin/python benchmarks/dataplane.py --nodes 2 --ranks 16 --batch 128 --length 2048 --k 32
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's opcd, run from anywhere
from json_out import write_json  # noqa: E402  benchmarks/: the script's own folder

from opcd.protocol import UpdateBatch  # noqa: E402
from opcd.workers.group import WorkerGroup, init_ray  # noqa: E402
from opcd.workers.placement import make_pools, remove_pools  # noqa: E402


class Sink:
    """A rank that measures what reaches it instead of training on it."""

    def __init__(self, rank: int = 0, world_size: int = 1, rendezvous=None):
        self.rank, self.world_size = rank, world_size

    def update(self, batch: UpdateBatch) -> dict:
        received = payload_bytes(batch)
        whole = batch.share is None  # the old path: this rank trains on rows rank, rank + N, ... of it
        mask = batch.response_mask[self.rank::self.world_size] if whole else batch.response_mask
        # padding share of the token-level tensors as they arrived (a share's are packed: none)
        arrived = batch.teacher_logprobs.shape[0] * (batch.teacher_logprobs.shape[1] if whole else 1)
        return {"rank": self.rank, "received_bytes": received, "rows": mask.shape[0], "tokens": int(mask.sum()),
                "arrived_real_tokens": int(batch.response_mask.sum()), "arrived_token_slots": arrived,
                "node": ray.get_runtime_context().get_node_id()}


def long_tailed_lengths(count: int, longest: int, seed: int) -> torch.Tensor:
    """Most responses short, a few near the cap: a log-normal with its median at 1/8 of the cap."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.exp(torch.randn(count, generator=g) * 1.0 + math.log(longest / 8))
    return raw.round().clamp(1, longest).long()


def synthetic_batch(count: int, longest: int, k: int, seed: int = 0) -> UpdateBatch:
    lengths = long_tailed_lengths(count, longest, seed)
    width = int(lengths.max())
    mask = torch.arange(width)[None] < lengths[:, None]
    g = torch.Generator().manual_seed(seed + 1)
    return UpdateBatch(prompt_ids=[[1, 2, 3]] * count, response_ids=torch.randint(0, 50_000, (count, width), generator=g),
                       response_mask=mask, support_ids=torch.randint(0, 50_000, (count, width, k), generator=g),
                       support_mask=None, teacher_logprobs=torch.randn(count, width, k, generator=g),
                       num_tokens=int(mask.sum()), num_sequences=count)


def payload_bytes(batch: UpdateBatch) -> int:
    tensors = [batch.response_ids, batch.response_mask, batch.support_ids, batch.teacher_logprobs]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def measure(group: WorkerGroup, batch: UpdateBatch, scatter: bool) -> dict:
    group.scatter = scatter
    group.call(Sink.update, batch)  # warm-up: the actors' first call imports and deserialises code
    start = time.perf_counter()
    ranks = group.call(Sink.update, batch)
    seconds = time.perf_counter() - start
    world = group.world_size
    stored = sum(payload_bytes(share) for share in batch.rank_shares(world)) if scatter else world * payload_bytes(batch)
    real_tokens = batch.num_tokens
    real_bytes = real_tokens * batch.support_ids.shape[-1] * (4 + 4)
    tokens = [r["tokens"] for r in ranks]
    driver_node = ray.get_runtime_context().get_node_id()
    crossed = sum(r["received_bytes"] for r in ranks if r["node"] != driver_node)
    return {"cross_node_bytes": crossed, "cross_node_copies_of_real_payload": crossed / real_bytes,
            "ranks_off_driver_node": sum(r["node"] != driver_node for r in ranks),"path": "new (rank shares)" if scatter else "old (whole batch by value)", "driver_s": seconds,
            "object_store_bytes": stored, "store_copies_of_real_payload": stored / real_bytes,
            "max_rank_received_bytes": max(r["received_bytes"] for r in ranks),
            "max_rank_share_of_real_bytes": max(r["received_bytes"] for r in ranks) / real_bytes,
            "padding_share": 1 - sum(r["arrived_real_tokens"] for r in ranks) / sum(r["arrived_token_slots"] for r in ranks),
            "max_over_mean_tokens": max(tokens) / (sum(tokens) / world), "ranks": ranks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=2048, help="longest response T")
    parser.add_argument("--k", type=int, default=32, help="support size K")
    parser.add_argument("--nodes", type=int, default=1, choices=(1, 2),
                        help="2: two local Ray nodes, half of the ranks on each; reports the bytes crossing")
    parser.add_argument("--json", default=None, help="also write the figures here ('-' = stdout)")
    args = parser.parse_args()
    if args.nodes == 2 and args.ranks % 2:
        parser.error(f"--nodes 2 needs an even --ranks (half on each node), got {args.ranks}")
    cluster = start_two_nodes(args.ranks) if args.nodes == 2 else None
    if cluster is None:
        init_ray(None, max(args.ranks, 8))
    batch = synthetic_batch(args.batch, args.length, args.k)
    try:
        if cluster is None:
            group = WorkerGroup("dataplane", Sink, {}, world_size=args.ranks, num_cpus=0.01)
        else:  # one bundle of 1 CPU per rank, packed: each node's CPUs hold half of the ranks
            pool = make_pools({"dataplane": args.ranks}, gpus=False, placement="separate")["dataplane"]
            group = WorkerGroup("dataplane", Sink, {}, world_size=args.ranks, pool=pool)
        results = [measure(group, batch, scatter) for scatter in (False, True)]
        group.shutdown()
        if cluster is not None:
            remove_pools([pool])
    finally:
        if cluster is not None:
            ray.shutdown()
            cluster.shutdown()
    real_bytes = batch.num_tokens * args.k * 8
    print(f"B={args.batch} T={batch.response_ids.shape[1]} K={args.k} ranks={args.ranks}: "
          f"{batch.num_tokens} real tokens, real-token payload {real_bytes / 2**20:.1f} MiB, "
          f"1/N of it {real_bytes / args.ranks / 2**20:.2f} MiB")
    crossing = f" {'cross-node MiB':>15} {'copies':>7}" if args.nodes == 2 else ""
    print(f"{'path':28} {'store MiB':>10} {'copies':>7} {'max rank MiB':>13} {'x real/N':>9} {'padding':>8} "
          f"{'max/mean tok':>13} {'driver s':>9}{crossing}")
    for r in results:
        crossing = (f" {r['cross_node_bytes'] / 2**20:15.1f} {r['cross_node_copies_of_real_payload']:7.2f}"
                    if args.nodes == 2 else "")
        print(f"{r['path']:28} {r['object_store_bytes'] / 2**20:10.1f} {r['store_copies_of_real_payload']:7.2f} "
              f"{r['max_rank_received_bytes'] / 2**20:13.2f} {r['max_rank_share_of_real_bytes'] * args.ranks:9.2f} "
              f"{r['padding_share']:8.1%} {r['max_over_mean_tokens']:13.2f} {r['driver_s']:9.3f}{crossing}")
    if args.nodes == 2:
        print(f"{results[0]['ranks_off_driver_node']} of {args.ranks} ranks on the node without the driver")
    if args.json:
        write_json({"batch": args.batch, "length": args.length, "k": args.k, "ranks": args.ranks, "nodes": args.nodes,
                    "real_tokens": batch.num_tokens, "results": results}, args.json)


def start_two_nodes(ranks: int):
    """A local Ray cluster of a head node (the driver's) and a second node, each with CPUs for half of the
    ranks and an object store of its own; the driver joins it."""
    from ray.cluster_utils import Cluster

    node = {"num_cpus": ranks // 2, "object_store_memory": 3 * 2**30}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    init_ray(cluster.address, None)
    return cluster


if __name__ == "__main__":
    main()
