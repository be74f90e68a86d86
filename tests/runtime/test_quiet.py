"""Third-party output that every run printed: the stray ESC[0m line at exit (opcd/runtime/quiet.py)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Ray's CLI logger runs colorama.init(strip=False) on import; opcd's cli imports ray before it exits.
PROGRAM = """
import sys
import ray.autoscaler._private.cli_logger
if sys.argv[1] == "opcd":
    from opcd.runtime.quiet import no_colour_reset_at_exit
    no_colour_reset_at_exit()
print("done")
"""


def _terminal_output(mode: str) -> bytes:
    """What the program writes to a terminal (a pty), exit hooks included."""
    leader, follower = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM, mode], stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the pty closes when the program has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=60)
    os.close(leader)
    return b"".join(chunks)


def test_no_stray_colour_reset_after_the_last_line():
    """Regression: every run ended with a line holding only ESC[0m (colorama's exit hook)."""
    assert _terminal_output("plain").endswith(b"done\r\n\x1b[0m")  # what Ray's import alone leaves
    assert _terminal_output("opcd") == b"done\r\n"
