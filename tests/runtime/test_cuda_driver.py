"""The NVIDIA driver check (opcd/runtime/cuda_driver.py): the comparison against NVIDIA's table for many
(driver, CUDA) pairs, the /proc/driver/nvidia/version parser, and the probing edge with pynvml and
nvidia-smi made absent so that a fake /proc file given by path is what is read."""

import logging
import os
import sys

import pytest
import torch

from opcd.errors import OpcdError
from opcd.runtime import cuda_driver as C
from opcd.runtime import devices

V = C.parse_version


@pytest.mark.parametrize("driver, cuda, verdict", [
    # CUDA 13.x: 580 is the family's floor and 13.0's own driver is 580.65.06
    ("580.65.06", "13.0", "ok"),
    ("580.95.05", "13.0", "ok"),
    ("590.44.01", "13.0", "ok"),
    ("580.65.06", "13.1", "ok"),       # 13.1's newer own driver is not in the table: 13.0's is the bar
    ("580.00", "13.0", "minor_compat"),
    ("579.99", "13.0", "too_old"),
    ("575.51.03", "13.0", "too_old"),  # a CUDA 12.9 driver cannot run a CUDA 13 build
    ("570.86.15", "13.0", "too_old"),
    ("550.54.14", "13.0", "too_old"),
    ("535.104.05", "13.0", "too_old"),
    # CUDA 12.x: 12.8 shipped with 570.26, 12.4 with 550.54.14; 525.60.13 is the family's floor
    ("570.26", "12.8", "ok"),
    ("570.124.06", "12.8", "ok"),
    ("580.65.06", "12.8", "ok"),
    ("565.57.01", "12.8", "minor_compat"),
    ("550.54.14", "12.8", "minor_compat"),
    ("535.104.05", "12.8", "minor_compat"),
    ("525.60.13", "12.8", "minor_compat"),
    ("525.60.12", "12.8", "too_old"),
    ("520.61.05", "12.8", "too_old"),
    ("470.256.02", "12.8", "too_old"),
    ("550.54.14", "12.4", "ok"),
    ("550.54.13", "12.4", "minor_compat"),
    ("575.51.03", "12.9", "ok"),
    ("560.28.03", "12.6", "ok"),
    ("525.60.13", "12.0", "ok"),
    ("515.105.01", "12.0", "too_old"),
    ("520.61.05", "11.8", "ok"),
    ("450.80.02", "11.8", "minor_compat"),
    ("440.33.01", "11.8", "too_old"),
    ("999.0", "14.0", "unknown_cuda"),  # a CUDA major the table does not know is not judged
])
def test_verdict_for_many_pairs(driver, cuda, verdict):
    assert C.driver_verdict(V(driver), V(cuda))[0] == verdict


def test_the_version_that_matters_is_named():
    assert C.driver_verdict(V("575.51.03"), V("13.0")) == ("too_old", (580,))
    assert C.driver_verdict(V("550.54.14"), V("12.8")) == ("minor_compat", (570, 26))
    assert C.driver_verdict(V("580.65.06"), V("13.0")) == ("ok", (580, 65, 6))


def test_message_names_both_versions():
    line = C.driver_message(V("570.86.15"), V("13.0"))
    assert line.startswith("NVIDIA driver 570.86.15 is too old for torch's CUDA 13.0 build: CUDA 13.x needs "
                           "driver >= 580")
    assert "\n" not in line
    assert "minor-version compatibility" in C.driver_message(V("550.54.14"), V("12.8"))
    assert C.driver_message(V("580.65.06"), V("13.0")) is None


@pytest.mark.parametrize("text, expected", [("580.65.06", (580, 65, 6)), ("12.8", (12, 8)), (" 570.26\n", (570, 26))])
def test_parse_version(text, expected):
    assert C.parse_version(text) == expected


def test_driver_versions_are_written_as_nvidia_does():
    assert [C.fmt(v) for v in [(580, 65, 6), (570, 26), (580,), (525, 60, 13)]] == ["580.65.06", "570.26", "580",
                                                                                   "525.60.13"]


@pytest.mark.parametrize("bad", ["", "N/A", "580.65.06-beta", "v580"])
def test_parse_version_refuses_anything_else(bad):
    with pytest.raises(ValueError):
        C.parse_version(bad)


PROC_PROPRIETARY = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 07:09:29 UTC 2025\n"
                    "GCC version:  gcc version 13.3.0 (Ubuntu 13.3.0-6ubuntu2~24.04)\n")
PROC_OPEN = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  "
             "(dvs-builder@U16-I3-B03-4-3)  Thu Jan 23 23:03:06 UTC 2025\nGCC version:  gcc version 12.2.0\n")


def test_proc_text_parser():
    assert C.driver_from_proc_text(PROC_PROPRIETARY) == (580, 65, 6)
    assert C.driver_from_proc_text(PROC_OPEN) == (570, 86, 15)
    assert C.driver_from_proc_text("GCC version: 13.3.0\n") is None


@pytest.fixture
def only_proc(monkeypatch):
    """No pynvml (import fails) and no nvidia-smi on PATH: the /proc file is the only source."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(C.shutil, "which", lambda name: None)


def test_probe_reads_the_proc_file_given_by_path(only_proc, tmp_path):
    proc = tmp_path / "version"
    proc.write_text(PROC_OPEN)
    assert C.probe_driver_version(str(proc)) == ((570, 86, 15), str(proc))
    missing = C.probe_driver_version(str(tmp_path / "absent"))
    assert missing[0] is None and "cannot read" in missing[1] and str(tmp_path / "absent") in missing[1]


def test_probe_prefers_nvidia_smi_over_proc(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\n[ \"$1\" = --query-gpu=driver_version ] && printf '580.95.05\\n580.95.05\\n'\n")
    smi.chmod(0o755)
    monkeypatch.setattr(C.shutil, "which", lambda name: str(smi) if name == "nvidia-smi" else None)
    proc = tmp_path / "version"
    proc.write_text(PROC_OPEN)
    assert C.probe_driver_version(str(proc)) == ((580, 95, 5), "nvidia-smi")


def test_check_stops_on_a_too_old_driver_in_one_line(only_proc, tmp_path):
    proc = tmp_path / "version"
    proc.write_text(PROC_OPEN)
    with pytest.raises(OpcdError) as info:
        C.check_driver("13.0", str(proc))
    message = str(info.value)
    assert "570.86.15" in message and "CUDA 13.0" in message and ">= 580" in message and str(proc) in message
    assert "\n" not in message


def test_check_warns_once_under_minor_compatibility_and_is_silent_when_fine(only_proc, tmp_path, caplog):
    proc = tmp_path / "version"
    proc.write_text(PROC_OPEN)
    with caplog.at_level(logging.WARNING, logger=C.__name__):
        C.check_driver("12.9", str(proc))  # 570.86.15 < 575.51.03, >= 525.60.13
        assert [r.getMessage() for r in caplog.records] == [C.driver_message((570, 86, 15), (12, 9))]
        caplog.clear()
        C.check_driver("12.8", str(proc))
        C.check_driver(None, str(proc))  # a CPU build of torch
    assert caplog.records == []


def test_check_warns_when_no_version_can_be_read(only_proc, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=C.__name__):
        C.check_driver("13.0", str(tmp_path / "absent"))
    assert len(caplog.records) == 1 and "not checked against CUDA 13.0" in caplog.records[0].getMessage()


def test_a_gpu_worker_checks_the_driver_and_a_cpu_worker_does_not(monkeypatch):
    seen = []
    monkeypatch.setattr(C, "check_driver_once", seen.append)
    monkeypatch.setattr(devices, "_ray_gpu_ids", lambda: [])
    assert devices.worker_device() == torch.device("cpu")
    assert seen == []
    monkeypatch.setattr(devices, "_ray_gpu_ids", lambda: [2])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert devices.worker_device() == torch.device("cuda", 0)
    assert seen == ["13.0"]


@pytest.mark.gpu
def test_on_a_gpu_machine_every_source_reads_the_same_driver_and_the_check_passes():
    """On a real driver: nvidia-smi and /proc agree (pynvml too when installed), and a working machine passes."""
    driver, source = C.probe_driver_version()
    assert driver is not None and driver >= (450,), source
    if os.path.exists(C.PROC_VERSION_FILE):  # some containers hide it
        with open(C.PROC_VERSION_FILE) as f:
            assert C.driver_from_proc_text(f.read()) == driver
    C.check_driver(torch.version.cuda)  # the GPU is in use by this very test run: the driver runs it
