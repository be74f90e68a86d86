"""The environment variables that follow a run from where it was launched to every worker, on every node.

A Ray actor on another node starts from that node's raylet environment, not the driver's, so a
setting exported only where the run is launched (the network interface NCCL must use, the Hugging
Face cache and token, wandb's key) would reach the driver alone. `forwarded` picks the driver's
variables by an allow-list of names and prefixes; `opcd/workers/group.py` puts them into every
actor's `runtime_env`. `ray_node_setup.sh` exports the same list on each node, for Ray's own
processes there.

The values are never logged or written by opcd: `describe` gives the names only. Ray, though, logs
every runtime_env it creates, values included (measured with Ray 2.60: `runtime_env_agent.log`, "Creating
runtime env: {"env_vars": ...}"), so variables whose names say they are secrets (`*TOKEN*`, `*KEY*`,
`*SECRET*`, `*PASSWORD*`: HF_TOKEN, WANDB_API_KEY) stay out of it: `receiving_secrets` gives the worker
class a constructor that takes them as an argument (kept in Ray's memory, not its logs) and sets them
before the worker's own constructor runs.
"""

from __future__ import annotations

import os

# Prefixes and exact names; keep in sync with FORWARD_PREFIXES in ray_node_setup.sh.
PREFIXES = ("NCCL_", "GLOO_", "TP_SOCKET_IFNAME", "HF_", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_", "WANDB_",
            "CUDA_", "TORCH_", "PYTORCH_", "VLLM_", "OPCD_")
# Set per actor by Ray (the GPUs it was given) or by opcd (devices.actor_env): never the driver's.
EXCLUDED = frozenset({"CUDA_VISIBLE_DEVICES"})
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")
SECRETS_KWARG = "_opcd_secret_env"


def forwarded(environ=os.environ) -> dict[str, str]:
    """The allow-listed variables of `environ` (the driver's), to be set in every worker."""
    return {name: value for name, value in environ.items()
            if name.startswith(PREFIXES) and name not in EXCLUDED}


def split_secrets(variables: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(plain, secret): the variables Ray may log, and those whose names say they are secrets."""
    secret = {name: value for name, value in variables.items() if any(word in name for word in SECRET_WORDS)}
    return {name: value for name, value in variables.items() if name not in secret}, secret


def receiving_secrets(worker_cls: type) -> type:
    """A subclass of `worker_cls` (same name) whose constructor takes the secret variables as the keyword
    argument SECRETS_KWARG and sets them in its process's environment before the worker's constructor runs."""
    def __init__(self, *args, **kwargs):
        os.environ.update(kwargs.pop(SECRETS_KWARG, None) or {})
        worker_cls.__init__(self, *args, **kwargs)

    return type(worker_cls.__name__, (worker_cls,), {"__init__": __init__, "__module__": __name__})


def describe(variables: dict[str, str]) -> str:
    """The names (never the values) of forwarded variables, for a log line."""
    return ", ".join(sorted(variables)) or "none"
