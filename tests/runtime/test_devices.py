"""Which devices a run uses (opcd/runtime/devices.py): ray.gpus_per_node defaults to the GPUs visible on the
driver's node, an explicit 0 forces CPU, and a worker computes on a GPU only when Ray gave it one.
A GPU machine is faked (torch's device count, CUDA_VISIBLE_DEVICES, `cuda_available`)."""

import pytest
import torch

from opcd.runtime import devices
from opcd.config import Machine, RayConfig, load_config, to_yaml


@pytest.fixture
def four_gpus(monkeypatch):
    """A node where torch counts 4 GPUs (as it would through NVML), CUDA_VISIBLE_DEVICES unset."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def test_gpus_per_node_defaults_to_the_visible_gpus(four_gpus, monkeypatch):
    monkeypatch.delenv("OPCD_NUM_GPUS", raising=False)
    assert RayConfig().gpus_per_node is None  # the schema leaves it to the machine
    assert Machine.here().gpus_per_node == 4
    assert load_config([]).ray.gpus_per_node == 4


def test_an_explicit_zero_forces_cpu(four_gpus):
    assert load_config(["ray.gpus_per_node=0"]).ray.gpus_per_node == 0


@pytest.mark.parametrize("setting", ["", "-1", " ", "-1,0"])
def test_hidden_gpus_are_not_counted(four_gpus, monkeypatch, setting):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", setting)
    assert Machine.here().gpus_per_node == 0


def test_cfg_shows_the_resolved_count(four_gpus):
    """`opcd distill --cfg` prints to_yaml(load_config(...)): the number, not null."""
    assert "gpus_per_node: 4" in to_yaml(load_config([]))
    assert "gpus_per_node: 0" in to_yaml(load_config(["ray.gpus_per_node=0"]))


def test_evaluate_counts_the_gpus_of_its_own_machine(four_gpus, tmp_path):
    """A run trained on a CPU machine saved gpus_per_node: 0; `opcd evaluate` on this 4-GPU node uses its
    GPUs unless its own command line says 0."""
    from opcd.pipelines.evaluate import load_run_config

    (tmp_path / "config.yaml").write_text(to_yaml(load_config(["ray.gpus_per_node=0"])))
    assert load_run_config(tmp_path, []).ray.gpus_per_node == 4
    assert load_run_config(tmp_path, ["ray.gpus_per_node=0"]).ray.gpus_per_node == 0


def test_negative_gpu_count_is_refused():
    from opcd.errors import ConfigError

    with pytest.raises(ConfigError, match="ray.gpus_per_node=-1"):
        RayConfig(gpus_per_node=-1)


def test_visible_device_list_reads_cuda_visible_devices_like_cuda():
    assert devices.visible_device_list(None, 2) == ["0", "1"]
    assert devices.visible_device_list("3,5", 8) == ["3", "5"]
    assert devices.visible_device_list("2,-1,4", 8) == ["2"]  # CUDA stops at the first invalid entry
    assert devices.visible_device_list("", 8) == []


def test_a_worker_uses_a_gpu_only_when_ray_gave_it_one():
    cpu = torch.device("cpu")
    assert devices.choose_device([], cuda_available=True) == cpu  # GPUs visible, none assigned
    assert devices.choose_device([], cuda_available=False) == cpu
    assert devices.choose_device([3], cuda_available=True) == torch.device("cuda", 0)  # Ray renumbers from 0
    assert devices.choose_device(None, cuda_available=False) == cpu  # in process, no GPU
    with pytest.raises(RuntimeError, match=r"Ray assigned GPU \[1\]"):
        devices.choose_device([1], cuda_available=False)


def test_actors_without_gpus_hide_them():
    assert devices.actor_env(0) == {"CUDA_VISIBLE_DEVICES": ""}
    assert devices.actor_env(0.0) == {"CUDA_VISIBLE_DEVICES": ""}
    assert devices.actor_env(0.5) == {} and devices.actor_env(1) == {}  # Ray sets it to the assigned GPU


@pytest.mark.slow
def test_ray_actor_without_gpus_computes_on_cpu_and_sees_none(local_ray):
    """Through Ray: an actor that asked for no GPU sees none (whatever the node has) and picks the CPU."""
    import os

    import ray

    from opcd.workers.group import WorkerGroup

    class Probe:
        def __init__(self, rank: int = 0, world_size: int = 1):
            self.device = devices.worker_device()

        def facts(self):
            return os.environ.get("CUDA_VISIBLE_DEVICES"), str(self.device), ray.get_gpu_ids()

    group = WorkerGroup("probe", Probe, {}, num_gpus=0)
    try:
        assert group.gather(Probe.facts) == ("", "cpu", [])
    finally:
        group.shutdown()
