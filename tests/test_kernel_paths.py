"""The numeric tests pass on the CPU kernels of another machine, not only this one's.

ATen picks its vectorised kernels once per process from the CPU (AVX-512 where there is one);
``ATEN_CPU_CAPABILITY`` forces an older path. A fresh process runs the numeric tests on the AVX2
path when this CPU has a wider one, so a tolerance tuned on AVX-512 cannot turn main red on the
AVX2-only machines most users and CI runners have.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The tests whose assertions compare floating-point results of two computations.
NUMERIC_TESTS = ["tests/loss", "tests/workers/test_student.py", "tests/workers/test_frozen.py",
                 "tests/rollout", "tests/test_models.py"]


@pytest.mark.slow
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT", "NO AVX"),
                    reason="this CPU's default kernels are already the AVX2 (or older) path")
def test_numeric_tests_pass_on_the_avx2_kernels():
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                           env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "AVX2", probe.stdout
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                          *NUMERIC_TESTS], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:]
