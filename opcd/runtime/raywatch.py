"""After a hard kill of the driver, stop the Ray agents it leaves behind (best effort, Linux).

A local Ray instance shares the driver's fate: when the driver is SIGKILLed, the GCS, the raylet
and the workers go with it. Two children of the raylet do not: the dashboard agent and the
runtime-env agent notice their raylet is gone, then block reporting that to the (dead) GCS and stay
alive indefinitely (measured with Ray 2.60). `watch(raylet_pid)`, called once after a local
`ray.init`, starts this module as a small detached process that notes the raylet's agent children
while the driver lives, and SIGKILLs them (pid and start time checked, so a reused pid is spared) a
few seconds after the driver is gone. It exits with the driver; a normal shutdown leaves it nothing
to kill.

    python -m opcd.runtime.raywatch DRIVER_PID RAYLET_PID     (started by `watch`, not by hand)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
POLL_S = 1.0
GRACE_S = 3.0  # let Ray's own teardown finish first


def watch(raylet_pid: int | None) -> None:
    """Start the watchdog for this driver (never raises: it is a convenience)."""
    if raylet_pid is None:
        return
    try:
        subprocess.Popen([sys.executable, "-m", "opcd.runtime.raywatch", str(os.getpid()), str(raylet_pid)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)
    except OSError:
        pass


def local_raylet_pid() -> int | None:
    """The raylet that this driver's `ray.init` started, or None (joined a cluster, or Ray changed)."""
    try:
        import ray

        node = ray._private.worker._global_node  # private, hence the broad guard
        return node.all_processes["raylet"][0].process.pid
    except Exception:  # noqa: BLE001
        return None


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else (int(fields[1]), int(fields[19]))


def _agents_of(raylet_pid: int) -> dict[int, int]:
    """pid -> start time of the raylet's agent children."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) and stat[0] == raylet_pid:
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if command.startswith(AGENTS):
                found[int(entry.name)] = stat[1]
    return found


def main(driver_pid: int, raylet_pid: int) -> None:
    driver = _stat(driver_pid)
    agents: dict[int, int] = {}
    while driver is not None and _stat(driver_pid) == driver:
        if _stat(raylet_pid) is not None:
            agents.update(_agents_of(raylet_pid))
        time.sleep(POLL_S)
    time.sleep(GRACE_S)
    for pid, started in agents.items():
        stat = _stat(pid)
        if stat is not None and stat[1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
