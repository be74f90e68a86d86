"""Is the NVIDIA driver new enough for the CUDA build of torch? Checked once per process when a worker
starts computing on a GPU (`opcd.runtime.devices.worker_device`), so a too-old driver stops the run in
one line naming both versions instead of failing later inside a kernel launch or NCCL.

Two facts from NVIDIA's CUDA compatibility notes (CUDA Toolkit release notes, table "CUDA Toolkit and
Corresponding Driver Versions", Linux x86_64; and "Minor Version Compatibility"):

* each toolkit release names the driver it was released with (`TOOLKIT_DRIVERS`): 13.0 -> 580.65.06,
  12.8 -> 570.26, 12.4 -> 550.54.14, ...;
* within one major version a newer runtime also runs on an older driver down to the family's floor
  (`FAMILY_FLOORS`: 13.x -> 580, 12.x -> 525.60.13, 11.x -> 450.80.02), minus features that need the
  newer driver (PTX JIT of newer code among them).

So a driver below the family floor cannot run the build at all (`too_old`: the run stops), and one
between the floor and the toolkit's own driver runs under minor-version compatibility (`minor_compat`:
one warning line). torch 2.13's PyPI wheel is a CUDA 13.0 build: the driver must be 580 or newer.

Where the driver version comes from (`probe_driver_version`): pynvml when installed, else
`nvidia-smi --query-gpu=driver_version --format=csv,noheader`, else /proc/driver/nvidia/version.
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import subprocess
from typing import Literal

from opcd.errors import OpcdError

log = logging.getLogger(__name__)

Version = tuple[int, ...]

# CUDA (major, minor) -> the Linux x86_64 driver its toolkit release (GA) shipped with.
TOOLKIT_DRIVERS: dict[tuple[int, int], Version] = {
    (13, 0): (580, 65, 6),
    (12, 9): (575, 51, 3),
    (12, 8): (570, 26),
    (12, 6): (560, 28, 3),
    (12, 5): (555, 42, 2),
    (12, 4): (550, 54, 14),
    (12, 3): (545, 23, 6),
    (12, 2): (535, 54, 3),
    (12, 1): (530, 30, 2),
    (12, 0): (525, 60, 13),
    (11, 8): (520, 61, 5),
}
# CUDA major -> the oldest driver that runs any release of that major (minor-version compatibility).
FAMILY_FLOORS: dict[int, Version] = {13: (580,), 12: (525, 60, 13), 11: (450, 80, 2)}

PROC_VERSION_FILE = "/proc/driver/nvidia/version"

Verdict = Literal["ok", "minor_compat", "too_old", "unknown_cuda"]


def parse_version(text: str) -> Version:
    """'580.65.06' -> (580, 65, 6); '12.8' -> (12, 8). Raises ValueError on anything else."""
    text = text.strip()
    if not re.fullmatch(r"\d+(\.\d+)*", text):
        raise ValueError(f"not a dotted version: {text!r}")
    return tuple(int(part) for part in text.split("."))


def fmt(version: Version) -> str:
    """(580, 65, 6) -> '580.65.06' (NVIDIA writes the parts after the first with two digits)."""
    return ".".join([str(version[0])] + [f"{part:02d}" for part in version[1:]])


def required_driver(cuda: Version) -> tuple[Version | None, Version | None]:
    """(the driver the CUDA release shipped with, the family's floor) for a CUDA version; None where the
    table does not know it. A CUDA minor newer than the table's newest of its major (13.1 with only 13.0
    listed) takes that newest entry: its own driver is newer still, but the floor is what stops a run."""
    major, minor = cuda[0], cuda[1] if len(cuda) > 1 else 0
    floor = FAMILY_FLOORS.get(major)
    known = sorted(m for (maj, m) in TOOLKIT_DRIVERS if maj == major and m <= minor)
    toolkit = TOOLKIT_DRIVERS[(major, known[-1])] if known else None
    return toolkit, floor


def driver_verdict(driver: Version, cuda: Version) -> tuple[Verdict, Version | None]:
    """Whether `driver` runs a CUDA `cuda` build, and the version that matters for the message: the
    family floor when too old, the toolkit's driver when only minor-version compatible."""
    toolkit, floor = required_driver(cuda)
    if floor is None:
        return "unknown_cuda", None
    if driver < floor:
        return "too_old", floor
    if toolkit is not None and driver < toolkit:
        return "minor_compat", toolkit
    return "ok", toolkit or floor


def driver_message(driver: Version, cuda: Version) -> str | None:
    """The one line for a driver that is too old or only minor-version compatible; None when fine."""
    verdict, needed = driver_verdict(driver, cuda)
    cuda_s = ".".join(map(str, cuda))
    if verdict == "too_old":
        return (f"NVIDIA driver {fmt(driver)} is too old for torch's CUDA {cuda_s} build: CUDA {cuda[0]}.x needs "
                f"driver >= {fmt(needed)}; update the driver or install a torch built for an older CUDA")
    if verdict == "minor_compat":
        return (f"NVIDIA driver {fmt(driver)} is older than CUDA {cuda_s}'s own ({fmt(needed)}): running under "
                f"minor-version compatibility (features that need the newer driver, such as PTX JIT, fail)")
    return None


# -- probing (the edge: reads the machine) ---------------------------------------------------------------

def driver_from_proc_text(text: str) -> Version | None:
    """The driver version in /proc/driver/nvidia/version's first line, e.g. 'NVRM version: NVIDIA UNIX
    x86_64 Kernel Module  580.65.06  Sun Jul 27 ...' or '... Open Kernel Module for x86_64  570.86.15  ...'."""
    match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)\b", text)
    return parse_version(match.group(1)) if match else None


def probe_driver_version(proc_path: str = PROC_VERSION_FILE) -> tuple[Version | None, str]:
    """(driver version, where it was read) from pynvml, nvidia-smi or `proc_path`; (None, why) when none
    of them answers."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            raw = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return parse_version(raw.decode() if isinstance(raw, bytes) else raw), "pynvml"
    except Exception:  # not installed, no NVML library, an odd string: try the next source
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30, check=True).stdout
            first = out.strip().splitlines()[0] if out.strip() else ""
            return parse_version(first), "nvidia-smi"
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    try:
        with open(proc_path) as f:
            found = driver_from_proc_text(f.read())
        if found is not None:
            return found, proc_path
        return None, f"no driver version in {proc_path}"
    except OSError as exc:
        return None, f"no pynvml, no nvidia-smi answer, cannot read {proc_path} ({exc.strerror or exc})"


def check_driver(cuda_version: str | None, proc_path: str = PROC_VERSION_FILE) -> None:
    """Stop (OpcdError, one line naming both versions) when the driver cannot run torch's CUDA build;
    warn in one line under minor-version compatibility; say nothing when either version is unknown
    (a CPU build of torch has cuda_version None)."""
    if not cuda_version:
        return
    try:
        cuda = parse_version(cuda_version)
    except ValueError:
        log.warning("torch.version.cuda=%r is not a version: the NVIDIA driver is not checked", cuda_version)
        return
    driver, source = probe_driver_version(proc_path)
    if driver is None:
        log.warning("cannot read the NVIDIA driver version (%s): not checked against CUDA %s", source, cuda_version)
        return
    message = driver_message(driver, cuda)
    if message is None:
        return
    if driver_verdict(driver, cuda)[0] == "too_old":
        raise OpcdError(f"{message} (driver version from {source})")
    log.warning(message)


@functools.lru_cache(maxsize=1)
def check_driver_once(cuda_version: str | None) -> None:
    """`check_driver` once per process (every worker calls it when it picks its GPU)."""
    check_driver(cuda_version)
