"""The cluster scripts, checked without a cluster: the Docker start (RDMA devices only where the host has
them), the SLURM batch script and the two-host ssh start, each in dry run (OPCD_DRY_RUN=1 prints the
commands), plus `bash -n` and shellcheck when it is installed. Stand-ins on PATH answer `scontrol show
hostnames` and `getent ahostsv4` as a SLURM node would."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ["run_docker.sh", "run_docker_b200.sh", "scripts/cluster_lib.sh", "scripts/slurm/opcd.sbatch",
           "scripts/ssh/two_hosts.sh"]
LAUNCHER = ["scripts/sys_consolidate.sh", "--model", "Qwen/Qwen2.5-7B-Instruct", "--exp_name", "run one",
            "--system_prompt_type", "medmcqa"]


def _run(argv: list[str], env: dict, cwd: Path = REPO) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPCD_", "SLURM_", "NCCL_"))
             and k not in ("MASTER_ADDR", "RAY_PORT", "HF_HOME")}
    return subprocess.run(argv, env={**clean, **env}, capture_output=True, text=True, timeout=60, cwd=cwd)


def _lines(proc: subprocess.CompletedProcess) -> list[list[str]]:
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("name", SCRIPTS)
def test_bash_syntax(name):
    proc = subprocess.run(["bash", "-n", str(REPO / name)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_is_clean():
    proc = subprocess.run(["shellcheck", "-x", *SCRIPTS], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["scripts/slurm/opcd.sbatch", "scripts/ssh/two_hosts.sh"])
def test_entry_points_are_executable(name):
    assert os.access(REPO / name, os.X_OK)


# -- Docker ---------------------------------------------------------------------------------------------

def _docker(script: str, tmp_path: Path, ib: bool, **env) -> tuple[list[str], list[str], str]:
    ib_dir = tmp_path / "infiniband"
    if ib:
        ib_dir.mkdir()
    proc = _run(["bash", script, "python", "-c", "print(1)"],
                {"OPCD_DRY_RUN": "1", "OPCD_IB_DEVICES": str(ib_dir), **env})
    build, run = _lines(proc)
    return build, run, proc.stderr


@pytest.mark.parametrize("script, dockerfile", [("run_docker.sh", "docker/Dockerfile"),
                                                ("run_docker_b200.sh", "docker/Dockerfile.b200")])
def test_docker_run_carries_rdma_when_the_host_has_infiniband(tmp_path, script, dockerfile):
    build, run, _ = _docker(script, tmp_path, ib=True)
    assert build[:4] == ["docker", "build", "-f", dockerfile]
    assert run[:2] == ["docker", "run"] and run[-3:] == ["python", "-c", "print(1)"]
    words = " ".join(run)
    assert f"--device {tmp_path / 'infiniband'}" in words
    assert "--cap-add IPC_LOCK" in words and "--ulimit memlock=-1" in words
    assert "--gpus all" in words and "--network host" in words


def test_docker_run_starts_without_infiniband_on_a_host_without_it(tmp_path):
    """A host with no /dev/infiniband must still start the container (a --device that does not exist
    makes `docker run` fail); NCCL then uses sockets."""
    _, run, stderr = _docker("run_docker.sh", tmp_path, ib=False)
    assert "--device" not in run
    assert "--cap-add IPC_LOCK" in " ".join(run)
    assert "NCCL will use sockets" in stderr


def test_docker_passes_nccl_settings_by_name_only(tmp_path):
    _, run, _ = _docker("run_docker.sh", tmp_path, ib=True, NCCL_DEBUG="INFO", NCCL_IB_HCA="mlx5",
                        GLOO_SOCKET_IFNAME="ib0", HF_TOKEN="secret-token")
    passed = {run[i + 1] for i, word in enumerate(run) if word == "-e"}
    assert passed == {"NCCL_DEBUG", "NCCL_IB_HCA", "GLOO_SOCKET_IFNAME", "HF_TOKEN"}
    assert "secret-token" not in " ".join(run)


@pytest.mark.parametrize("name", ["docker/Dockerfile", "docker/Dockerfile.b200"])
def test_images_install_the_verbs_stack(name):
    text = (REPO / name).read_text()
    apt = re.search(r"apt-get install[^&]*", text).group(0).split()
    for package in ("rdma-core", "libibverbs1", "ibverbs-providers"):
        assert package in apt, (name, package)


def _flash_attn_pin() -> str:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        from pip._vendor import tomli as tomllib
    gpu = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    (pin,) = [r for r in gpu if r.startswith("flash-attn")]
    return pin


def test_flash_attn_is_pinned_and_the_images_say_the_same():
    pin = _flash_attn_pin()
    assert re.fullmatch(r"flash-attn==\d+\.\d+\.\d+(\.post\d+)?", pin), pin
    for name in ("docker/Dockerfile", "docker/Dockerfile.b200"):
        assert pin in (REPO / name).read_text(), name  # the comment naming the version the image builds
    assert "bash setup.sh --gpu" in (REPO / "docker" / "Dockerfile").read_text()  # which reads the pin


# -- SLURM ----------------------------------------------------------------------------------------------

@pytest.fixture
def fake_slurm_bin(tmp_path) -> Path:
    """`scontrol show hostnames gpu-[07-09]` and `getent ahostsv4 gpu-07` as a SLURM node answers them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[[ "$1 $2 $3" == "show hostnames gpu-[07-09]" ]] '
                                      "&& printf 'gpu-07\\ngpu-08\\ngpu-09\\n'\n")
    (bin_dir / "getent").write_text('#!/usr/bin/env bash\n[[ "$1 $2" == "ahostsv4 gpu-07" ]] '
                                    "&& printf '10.8.0.7        STREAM gpu-07\\n10.8.0.7        DGRAM\\n'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def _sbatch(bin_dir: Path, tmp_path: Path, *args: str, **env) -> subprocess.CompletedProcess:
    """The batch script as SLURM runs it: a copy in a spool folder, started from elsewhere, with the
    submit folder in SLURM_SUBMIT_DIR."""
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    shutil.copy(REPO / "scripts" / "slurm" / "opcd.sbatch", spool / "slurm_script")
    full = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "OPCD_DRY_RUN": "1", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu-[07-09]", "SLURM_SUBMIT_DIR": str(REPO), **env}
    return _run(["bash", str(spool / "slurm_script"), *args], full, cwd=tmp_path)


def test_sbatch_dry_run_starts_every_node_waits_launches_on_the_head_and_stops_ray(fake_slurm_bin, tmp_path):
    proc = _sbatch(fake_slurm_bin, tmp_path, *LAUNCHER)
    step, wait, launch, stop = _lines(proc)
    venv = str(REPO / ".venv")
    # one task per node, rank = SLURM_NODEID, the head's address from the node list
    assert step[:5] == ["srun", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert step[5] == f"--export=ALL,MASTER_ADDR=10.8.0.7,RAY_PORT=6379,OPCD_VENV={venv}"
    assert step[6:] == ["bash", "-c", "NODE_RANK=$SLURM_NODEID exec bash ray_node_setup.sh"]
    assert wait[1:] == ["tools/ray_wait_nodes.py", "--nodes", "3", "--timeout-s", "600"]
    assert launch == ["bash", LAUNCHER[0], "--nnodes", "3", *LAUNCHER[1:]]  # "run one" stays one word
    assert stop[:2] == ["srun", "--overlap"] and "--ntasks-per-node=1" in stop and stop[-2:] == ["stop", "--force"]
    assert "job 4242: 3 nodes (gpu-07 gpu-08 gpu-09), head gpu-07 at 10.8.0.7:6379" in proc.stderr


def test_sbatch_dry_run_of_the_launcher_itself_resolves_with_the_node_count(fake_slurm_bin, tmp_path):
    """The printed launcher line is one the launcher accepts: run it in its own dry run."""
    launch = _lines(_sbatch(fake_slurm_bin, tmp_path, *LAUNCHER))[2]
    proc = _run(launch, {"OPCD_DRY_RUN": "1", "OPCD_NUM_GPUS": "8"})
    overrides = shlex.split(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    assert "ray.address=auto" in overrides and "ray.nnodes=3" in overrides and "ray.gpus_per_node=8" in overrides


def test_sbatch_head_address_override_and_refusals(fake_slurm_bin, tmp_path):
    step = _lines(_sbatch(fake_slurm_bin, tmp_path, *LAUNCHER, OPCD_HEAD_IP="192.0.2.5"))[0]
    assert "MASTER_ADDR=192.0.2.5" in step[5]
    cases = [({}, [], "no launcher given"),
             ({}, LAUNCHER[1:], "the first argument must be a launcher script of the checkout"),
             ({}, [*LAUNCHER, "--nnodes", "2"], "--nnodes is set from the node count (3)"),
             ({"SLURM_JOB_NODELIST": ""}, LAUNCHER, "SLURM_JOB_NODELIST is not set"),
             ({"SLURM_JOB_NODELIST": "cpu-[1-2]"}, LAUNCHER, "listed no node"),
             ({"SLURM_SUBMIT_DIR": str(tmp_path)}, LAUNCHER, "is not an opcd checkout")]
    for env, args, message in cases:
        proc = _sbatch(fake_slurm_bin, tmp_path, *args, **env)
        assert proc.returncode == 2 and message in proc.stderr, (env, args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) <= 2  # the error line (and the cleanup note)


def test_sbatch_refuses_a_loopback_head_address(fake_slurm_bin, tmp_path):
    (fake_slurm_bin / "getent").write_text("#!/usr/bin/env bash\nprintf '127.0.1.1       STREAM gpu-07\\n'\n")
    proc = _sbatch(fake_slurm_bin, tmp_path, *LAUNCHER)
    assert proc.returncode == 2 and "resolves to 127.0.1.1 (loopback); set OPCD_HEAD_IP" in proc.stderr


# -- ssh ------------------------------------------------------------------------------------------------

def _remote(line: list[str]) -> tuple[str, list[str]]:
    """An `ssh -o BatchMode=yes HOST 'cd REPO && WORDS'` line -> (HOST, WORDS)."""
    assert line[:3] == ["ssh", "-o", "BatchMode=yes"], line
    host, remote = line[3], line[4]
    prefix = f"cd {shlex.quote(str(REPO))} && "
    assert remote.startswith(prefix), remote
    return host, shlex.split(remote[len(prefix):])


def test_ssh_dry_run_has_the_same_shape(tmp_path):
    proc = _run(["bash", "scripts/ssh/two_hosts.sh", *LAUNCHER],
                {"OPCD_DRY_RUN": "1", "OPCD_HOSTS": "10.0.0.1 10.0.0.2"})
    commands = [_remote(line) for line in _lines(proc)]
    venv = str(REPO / ".venv")
    join = ["MASTER_ADDR=10.0.0.1", "RAY_PORT=6379", f"OPCD_VENV={venv}", "bash", "ray_node_setup.sh"]
    assert commands == [
        ("10.0.0.1", ["env", "NODE_RANK=0", *join]),
        ("10.0.0.2", ["env", "NODE_RANK=1", *join]),
        ("10.0.0.1", [f"{venv}/bin/python", "tools/ray_wait_nodes.py", "--nodes", "2", "--timeout-s", "600"]),
        ("10.0.0.1", ["env", f"OPCD_VENV={venv}", "bash", LAUNCHER[0], "--nnodes", "2", *LAUNCHER[1:]]),
        ("10.0.0.1", [f"{venv}/bin/ray", "stop", "--force"]),
        ("10.0.0.2", [f"{venv}/bin/ray", "stop", "--force"]),
    ]


def test_ssh_needs_two_hosts():
    proc = _run(["bash", "scripts/ssh/two_hosts.sh", *LAUNCHER], {"OPCD_DRY_RUN": "1", "OPCD_HOSTS": "10.0.0.1"})
    assert proc.returncode == 2 and "OPCD_HOSTS must name two or more hosts" in proc.stderr


# -- waiting for the nodes ------------------------------------------------------------------------------

sys.path.insert(0, str(REPO / "tools"))
import ray_wait_nodes  # noqa: E402 (tools/ is not a package)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wait_returns_as_soon_as_the_nodes_are_there():
    clock, answers = _Clock(), iter([ConnectionError("no head yet"), 1, 2, 3])

    def count() -> int:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer
    assert ray_wait_nodes.wait_for_nodes(count, 3, 600, 5, lambda: clock.now, clock.sleep) == 3
    assert clock.now == 15  # four polls, three pauses


def test_wait_gives_up_at_the_timeout_with_the_last_count():
    clock = _Clock()
    assert ray_wait_nodes.wait_for_nodes(lambda: 1, 2, 30, 5, lambda: clock.now, clock.sleep) == 1
    assert clock.now == 30


def test_wait_tool_refuses_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        ray_wait_nodes.main(["--nodes", "0"])
    assert "--nodes 0" in capsys.readouterr().err


# -- the real paths, with recording stand-ins for docker, srun, ssh and the venv's programs ----------------

def _recorder(path: Path, log: Path, rc: str = "0") -> None:
    """An executable that appends its name and arguments (one line, shell-quoted) to `log`, exits `rc`."""
    # one write per call (line built first): a backgrounded call must not interleave with another's
    path.write_text(f'#!/usr/bin/env bash\nline="$(printf "%q " "$(basename "$0")" "$@")"\n'
                    f'echo "$line" >> "{log}"\nexit {rc}\n')
    path.chmod(0o755)


def _recorded(log: Path) -> list[list[str]]:
    return [shlex.split(line) for line in log.read_text().splitlines()]


def test_docker_runs_what_its_dry_run_prints(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    _recorder(bin_dir / "docker", log)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "OPCD_IB_DEVICES": str(tmp_path / "none")}
    proc = _run(["bash", "run_docker.sh", "nvidia-smi"], env)
    assert proc.returncode == 0, proc.stderr
    printed = _lines(_run(["bash", "run_docker.sh", "nvidia-smi"], {**env, "OPCD_DRY_RUN": "1"}))
    assert _recorded(log) == printed


@pytest.fixture
def fake_venv(tmp_path) -> tuple[Path, Path]:
    """A venv whose python, ray and opcd only record their calls; opcd exits $FAKE_OPCD_RC."""
    venv, log = tmp_path / "venv", tmp_path / "calls"
    (venv / "bin").mkdir(parents=True)
    for name in ("python", "ray"):
        _recorder(venv / "bin" / name, log)
    _recorder(venv / "bin" / "opcd", log, rc='"${FAKE_OPCD_RC:-0}"')
    return venv, log


@pytest.mark.parametrize("opcd_rc", [0, 3])
def test_sbatch_stops_ray_on_every_node_however_the_launcher_ends(fake_slurm_bin, fake_venv, tmp_path, opcd_rc):
    venv, log = fake_venv
    _recorder(fake_slurm_bin / "srun", log)
    proc = _sbatch(fake_slurm_bin, tmp_path, *LAUNCHER, OPCD_DRY_RUN="0", OPCD_VENV=str(venv),
                   FAKE_OPCD_RC=str(opcd_rc), OPCD_NUM_GPUS="8")
    assert proc.returncode == opcd_rc, proc.stderr
    calls = _recorded(log)
    # the node step runs in the background: its record may land anywhere; the stop is the last one
    assert calls[-1][:2] == ["srun", "--overlap"], calls
    assert calls[-1][-3:] == [str(venv / "bin" / "ray"), "stop", "--force"], calls
    names = [c[0] for c in calls]
    # (the node step's own record may be missing: the cleanup kills that background step)
    assert names.count("python") == 1 and names.count("opcd") == 1 and [c[:2] for c in calls].count(
        ["srun", "--overlap"]) == 1
    opcd = next(c for c in calls if c[0] == "opcd")
    assert opcd[1] == "distill" and "ray.nnodes=3" in opcd and "ray.address=auto" in opcd
    assert names.index("python") < names.index("opcd")  # the launcher waits for every node


@pytest.mark.parametrize("opcd_rc", [0, 3])
def test_ssh_stops_ray_on_every_host_however_the_launcher_ends(tmp_path, opcd_rc):
    log = tmp_path / "calls"
    ssh = tmp_path / "ssh"
    # the launcher's line fails with opcd_rc, every other remote command succeeds
    ssh.write_text(f'#!/usr/bin/env bash\nline="$(printf "%q " ssh "$@")"\necho "$line" >> "{log}"\n'
                   f'[[ "$2" == *sys_consolidate.sh* ]] && exit {opcd_rc}\nexit 0\n')
    ssh.chmod(0o755)
    proc = _run(["bash", "scripts/ssh/two_hosts.sh", *LAUNCHER], {"OPCD_SSH": str(ssh),
                                                                  "OPCD_HOSTS": "10.0.0.1 10.0.0.2"})
    assert proc.returncode == opcd_rc, proc.stderr
    remote = [shlex.split(c[2].split(" && ", 1)[1]) for c in _recorded(log)]
    hosts = [c[1] for c in _recorded(log)]
    stops = [i for i, r in enumerate(remote) if r[-2:] == ["stop", "--force"]]
    assert sorted(hosts[i] for i in stops) == ["10.0.0.1", "10.0.0.2"]
    launch = next(i for i, r in enumerate(remote) if "scripts/sys_consolidate.sh" in r)
    wait = next(i for i, r in enumerate(remote) if "tools/ray_wait_nodes.py" in r)
    assert hosts[launch] == hosts[wait] == "10.0.0.1" and wait < launch < min(stops)
    # the second host's join runs in the background (its ssh holds `ray start --block`) and is killed at
    # cleanup: its record may land anywhere, or nowhere
