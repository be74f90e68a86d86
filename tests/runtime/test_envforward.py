"""The environment allow-list forwarded to every worker (opcd/runtime/envforward.py)."""

from opcd.runtime.envforward import describe, forwarded


def test_allow_listed_names_are_forwarded_and_nothing_else():
    environ = {"NCCL_SOCKET_IFNAME": "ib0", "NCCL_IB_HCA": "mlx5", "GLOO_SOCKET_IFNAME": "eth0",
               "TP_SOCKET_IFNAME": "eth0", "HF_HOME": "/shared/hf", "HF_TOKEN": "hf_secret", "WANDB_API_KEY": "k",
               "CUDA_LAUNCH_BLOCKING": "1", "OPCD_CACHE": "/shared/cache", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
               "PATH": "/usr/bin", "HOME": "/root", "AWS_SECRET_ACCESS_KEY": "x", "RAY_ADDRESS": "auto",
               "CUDA_VISIBLE_DEVICES": "0,1", "MY_NCCL_SOCKET": "no"}
    assert forwarded(environ) == {k: v for k, v in environ.items() if k not in
                                  {"PATH", "HOME", "AWS_SECRET_ACCESS_KEY", "RAY_ADDRESS", "CUDA_VISIBLE_DEVICES",
                                   "MY_NCCL_SOCKET"}}


def test_the_log_line_names_variables_never_values():
    line = describe(forwarded({"HF_TOKEN": "hf_secret", "WANDB_API_KEY": "wandb_secret"}))
    assert line == "HF_TOKEN, WANDB_API_KEY" and "secret" not in line
    assert describe({}) == "none"


def test_ray_node_setup_exports_the_same_list():
    """The node script and the driver must agree on what a worker sees."""
    import re
    from pathlib import Path

    from opcd.runtime.envforward import PREFIXES

    script = (Path(__file__).resolve().parents[2] / "ray_node_setup.sh").read_text()
    listed = re.search(r'^FORWARD_PREFIXES="([^"]*)"', script, re.MULTILINE)
    assert listed is not None and tuple(listed.group(1).split()) == PREFIXES
