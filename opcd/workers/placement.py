"""Where worker groups run: Ray placement groups ("pools") of one bundle per rank.

`colocate` (default): one pool whose bundle r holds rank r of EVERY group (student, teacher, ...),
each group taking an equal share of the bundle's GPU, so a single GPU runs the student, its vLLM
engine and the teacher, and N GPUs run N ranks of each. `separate`: one pool per group, a whole GPU
per rank (e.g. an 8-GPU student next to a 4-GPU teacher). Bundles are packed onto as few nodes as
possible (STRICT_PACK is not used, so a pool may span nodes when it has to). Ray does not promise
that a node's bundles have consecutive indices, so ranks take the bundles node by node
(`rank_order`): consecutive ranks, which form one tensor-parallel vLLM engine, share a node.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from opcd.errors import ConfigError

PLACEMENTS = ("colocate", "separate")


@dataclass(frozen=True)
class Pool:
    group: PlacementGroup
    gpus_per_actor: float
    cpus_per_actor: float = 1.0
    order: tuple[int, ...] | None = None  # rank -> bundle index (rank_order); None: bundle r for rank r
    nodes: tuple[str, ...] | None = None  # bundle index -> node id, when known

    def actor_options(self, rank: int) -> dict:
        """Ray actor options that put `rank` on its bundle of this pool."""
        bundle = self.order[rank] if self.order is not None else rank
        return {"num_cpus": self.cpus_per_actor, "num_gpus": self.gpus_per_actor,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=bundle)}

    def check_engines(self, ranks_per_engine: int) -> None:
        """One line when a tensor-parallel engine's ranks would not share a node."""
        if ranks_per_engine > 1 and self.nodes is not None:
            check_engines_on_one_node(list(self.nodes), self.order or tuple(range(len(self.nodes))), ranks_per_engine)


def rank_order(bundle_nodes: list[str]) -> tuple[int, ...]:
    """The bundle each rank takes, given each bundle's node: the bundles of one node together (nodes
    in the order of their first bundle), each node's in index order."""
    first: dict[str, int] = {}
    for index, node in enumerate(bundle_nodes):
        first.setdefault(node, index)
    return tuple(sorted(range(len(bundle_nodes)), key=lambda i: (first[bundle_nodes[i]], i)))


def check_engines_on_one_node(bundle_nodes: list[str], order: tuple[int, ...], ranks_per_engine: int) -> None:
    """Refuse, in one line, a placement where one tensor-parallel engine's ranks would span nodes."""
    for start in range(0, len(order) - ranks_per_engine + 1, ranks_per_engine):
        nodes = {bundle_nodes[order[rank]] for rank in range(start, start + ranks_per_engine)}
        if len(nodes) > 1:
            raise ConfigError(f"config rollout.vllm_tensor_parallel_size={ranks_per_engine}: the ranks "
                              f"{start}-{start + ranks_per_engine - 1} of one engine were placed on {len(nodes)} "
                              f"nodes; expected one node per engine (each node's GPUs a multiple of it)")


def bundles_needed(ranks: dict[str, int], gpus: bool, placement: str) -> dict[str, list[dict]]:
    """Pool name -> its bundles. Pure: what `make_pools` will ask Ray for."""
    if placement not in PLACEMENTS:
        raise ConfigError(f"ray.placement={placement!r}: expected one of {', '.join(PLACEMENTS)}")
    gpu = {"GPU": 1.0} if gpus else {}
    if placement == "colocate":
        return {"shared": [{"CPU": float(len(ranks)), **gpu} for _ in range(max(ranks.values()))]}
    return {name: [{"CPU": 1.0, **gpu} for _ in range(count)] for name, count in ranks.items()}


def gpus_per_actor(ranks: dict[str, int], gpus: bool, placement: str) -> float:
    """Each actor's GPU share: colocated groups split every GPU equally."""
    if not gpus:
        return 0.0
    return 1.0 / len(ranks) if placement == "colocate" else 1.0


def make_pools(ranks: dict[str, int], gpus: bool, placement: str = "colocate",
               timeout_s: float = 300.0) -> dict[str, Pool]:
    """Reserve the pools for groups `ranks` (name -> ranks); -> name -> Pool. Refused with one line
    when the cluster cannot hold them."""
    wanted = bundles_needed(ranks, gpus, placement)
    _check_capacity(wanted, placement)
    groups = {name: placement_group(bundles, strategy="PACK", name=f"opcd-{name}") for name, bundles in wanted.items()}
    ready, _ = ray.wait([g.ready() for g in groups.values()], num_returns=len(groups), timeout=timeout_s)
    if len(ready) < len(groups):
        remove_pools(groups.values())
        raise ConfigError(f"ray.placement={placement}: the pools ({_describe(wanted)}) could not be placed within "
                          f"{timeout_s:.0f} s (cluster: {_resources(ray.cluster_resources())})")
    share = gpus_per_actor(ranks, gpus, placement)
    nodes = {name: _bundle_nodes(group) for name, group in groups.items()}
    return {name: Pool(groups[pool], share, order=rank_order(nodes[pool]), nodes=tuple(nodes[pool]))
            for name in ranks for pool in ["shared" if placement == "colocate" else name]}


def _bundle_nodes(group: PlacementGroup) -> list[str]:
    """The node each bundle of a ready placement group was put on, by bundle index."""
    nodes = placement_group_table(group)["bundles_to_node_id"]
    return [nodes[index] for index in range(len(nodes))]


def remove_pools(pools) -> None:
    seen = set()
    for pool in pools:
        group = pool.group if isinstance(pool, Pool) else pool
        if group.id not in seen:
            seen.add(group.id)
            remove_placement_group(group)


def _check_capacity(wanted: dict[str, list[dict]], placement: str) -> None:
    total = ray.cluster_resources()
    for resource in ("CPU", "GPU"):
        need = sum(b.get(resource, 0.0) for bundles in wanted.values() for b in bundles)
        if need > total.get(resource, 0.0):
            raise ConfigError(f"ray.placement={placement}: the pools need {need:g} {resource} ({_describe(wanted)}), "
                              f"the cluster has {total.get(resource, 0.0):g} {resource} (check ray.ranks_per_group, "
                              f"ray.teacher_ranks, ray.gpus_per_node and ray.nnodes)")


def _describe(wanted: dict[str, list[dict]]) -> str:
    return "; ".join(f"{name}: {len(b)} x {_resources(b[0]) if b else '{}'}" for name, b in wanted.items())


def _resources(resources: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU")) + "}"
