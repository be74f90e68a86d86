"""SIGTERM ends a run the way Ctrl-C does: Python unwinds (a checkpoint being written is dropped, the
previous one stays), the workers and Ray are stopped, and the command prints one line (exit 143).

Ray's driver installs its own SIGTERM handler in `ray.init`: it kills Ray's daemons first and then
calls `sys.exit(1)`, so the driver's core worker loses its GCS mid-call and aborts with a C++ stack
dump (exit -6). `handle_sigterm()` is therefore called again right after `ray.init`.
"""

from __future__ import annotations

import signal
import threading


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM (a KeyboardInterrupt, so every Ctrl-C cleanup path runs)."""


def handle_sigterm() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def _raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
    raise Terminated()
