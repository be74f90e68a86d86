"""The hardware step (opcd/config/resolve.py): the same config resolved for any machine, without
looking at the one the test runs on."""

from __future__ import annotations

import subprocess
import sys

import pytest

from opcd.config import Machine, load_config
from opcd.errors import ConfigError
from opcd.runtime import devices

CLUSTER = ["ray.nnodes=2", "ray.address=auto"]


@pytest.fixture
def no_probing(monkeypatch):
    """Any look at this machine's GPUs fails the test: resolution must use the Machine it is given."""
    monkeypatch.setattr(devices, "visible_gpu_count", lambda: pytest.fail("probed this machine's GPUs"))


def test_a_2x8_cluster_resolves_the_same_on_any_machine(no_probing):
    cfg = load_config(CLUSTER, machine=Machine(gpus_per_node=8, vllm_installed=True))
    assert (cfg.ray.gpus_per_node, cfg.ray.ranks_per_group) == (8, 16)
    assert (cfg.model.dtype, cfg.model.activation_checkpointing) == ("bfloat16", True)
    assert (cfg.rollout.backend, cfg.evaluate.ood_backend) == ("vllm", "vllm")
    no_vllm = load_config(CLUSTER, machine=Machine(8, vllm_installed=False))
    assert no_vllm.rollout.backend == "hf" and no_vllm.ray.ranks_per_group == 16


def test_a_laptop_resolves_to_the_cpu_path(no_probing):
    cfg = load_config([], machine=Machine(gpus_per_node=0, vllm_installed=True))
    assert (cfg.ray.gpus_per_node, cfg.ray.ranks_per_group) == (0, 1)
    assert (cfg.model.dtype, cfg.model.activation_checkpointing, cfg.rollout.backend) == ("float32", False, "hf")


def test_explicit_settings_win_over_the_machine(no_probing):
    cfg = load_config(["ray.gpus_per_node=4", "model.dtype=float32", "rollout.backend=hf"], machine=Machine(8, True))
    assert (cfg.ray.gpus_per_node, cfg.ray.ranks_per_group, cfg.model.dtype, cfg.rollout.backend) == (4, 4, "float32", "hf")


def test_checks_that_need_the_machine_name_the_key(no_probing):
    with pytest.raises(ConfigError, match=r"^config ray\.ranks_per_group=12: expected at most 8 GPU ranks"):
        load_config(["ray.ranks_per_group=12"], machine=Machine(8, True))
    with pytest.raises(ConfigError, match=r"^config rollout\.vllm_tensor_parallel_size=2: expected 1 on CPU"):
        load_config(["rollout.backend=vllm", "rollout.vllm_tensor_parallel_size=2"], machine=Machine(0, True))


def test_the_environment_describes_another_machine(monkeypatch, no_probing):
    monkeypatch.setenv("OPCD_NUM_GPUS", "8")
    monkeypatch.setenv("OPCD_VLLM", "1")
    assert Machine.here() == Machine(8, True)
    monkeypatch.setenv("OPCD_NUM_GPUS", "eight")
    with pytest.raises(ConfigError, match=r"^config OPCD_NUM_GPUS='eight': expected a whole number"):
        Machine.here()


def test_cfg_prints_the_clusters_config_on_this_laptop():
    """`opcd distill --cfg` with the machine described by the environment: what the 2x8 cluster runs."""
    env = {"OPCD_NUM_GPUS": "8", "OPCD_VLLM": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "opcd.cli", "distill", "--cfg", *CLUSTER], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ranks_per_group: 16" in out.stdout and "backend: vllm" in out.stdout and "dtype: bfloat16" in out.stdout
