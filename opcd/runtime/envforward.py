"""The environment variables that follow a run from where it was launched to every worker, on every node.

A Ray actor on another node starts from that node's raylet environment, not the driver's, so a
setting exported only where the run is launched (the network interface NCCL must use, the Hugging
Face cache and token, wandb's key) would reach the driver alone. `forwarded` picks the driver's
variables by an allow-list of names and prefixes; `opcd/workers/group.py` puts them into every
actor's `runtime_env`. `ray_node_setup.sh` exports the same list on each node, for Ray's own
processes there.

The values are never logged or written by opcd: `describe` gives the names only. (Ray keeps an
actor's runtime_env in its cluster state, readable by whoever can reach the cluster, as any job
submitted to it.)
"""

from __future__ import annotations

import os

# Prefixes and exact names; keep in sync with FORWARD_PREFIXES in ray_node_setup.sh.
PREFIXES = ("NCCL_", "GLOO_", "TP_SOCKET_IFNAME", "HF_", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_", "WANDB_",
            "CUDA_", "TORCH_", "PYTORCH_", "VLLM_", "OPCD_")
# Set per actor by Ray (the GPUs it was given) or by opcd (devices.actor_env): never the driver's.
EXCLUDED = frozenset({"CUDA_VISIBLE_DEVICES"})


def forwarded(environ=os.environ) -> dict[str, str]:
    """The allow-listed variables of `environ` (the driver's), to be set in every worker."""
    return {name: value for name, value in environ.items()
            if name.startswith(PREFIXES) and name not in EXCLUDED}


def describe(variables: dict[str, str]) -> str:
    """The names (never the values) of forwarded variables, for a log line."""
    return ", ".join(sorted(variables)) or "none"
