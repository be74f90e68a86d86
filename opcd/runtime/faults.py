"""Test-only fault injection: one rank of one worker group fails inside one call, on purpose.

The fault tests (tests/test_faults_on_cpu.py) need a rank that raises, or whose process is killed,
at a known moment of a real run started from the command line. Set on the driver:

    OPCD_TEST_FAULT=GROUP:METHOD:RANK:CALL:ACTION     e.g. student:update:1:2:kill

and the CALL-th call (from 1) of METHOD on rank RANK of the worker group GROUP raises a RuntimeError
(ACTION `raise`) or SIGKILLs its own process (ACTION `kill`) before doing any work. Only
`WorkerGroup` reads it, at construction: without the variable the worker classes are used as they
are, so this module costs a normal run nothing.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from opcd.errors import ConfigError

ENV = "OPCD_TEST_FAULT"
ACTIONS = ("raise", "kill")


@dataclass(frozen=True)
class Fault:
    group: str
    method: str
    rank: int
    call: int
    action: str


def planned(environ=os.environ) -> Fault | None:
    """The fault that $OPCD_TEST_FAULT asks for, or None."""
    value = environ.get(ENV, "").strip()
    if not value:
        return None
    parts = value.split(":")
    if len(parts) != 5 or not parts[2].isdigit() or not parts[3].isdigit() or int(parts[3]) < 1 \
            or parts[4] not in ACTIONS:
        raise ConfigError(f"{ENV}={value!r}: expected GROUP:METHOD:RANK:CALL:ACTION with RANK >= 0, CALL >= 1 and "
                          f"ACTION one of {', '.join(ACTIONS)} (e.g. student:update:1:2:kill)")
    return Fault(parts[0], parts[1], int(parts[2]), int(parts[3]), parts[4])


def with_fault(worker_cls: type, group: str, environ=os.environ) -> type:
    """`worker_cls`, or when $OPCD_TEST_FAULT names `group` a subclass whose method fails as planned."""
    fault = planned(environ)
    if fault is None or fault.group != group:
        return worker_cls
    if not callable(getattr(worker_cls, fault.method, None)):
        raise ConfigError(f"{ENV}: {worker_cls.__name__} has no method {fault.method!r}")

    def faulty(self, *args, **kwargs):
        self._fault_calls = getattr(self, "_fault_calls", 0) + 1
        if self.rank == fault.rank and self._fault_calls == fault.call:
            if fault.action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault ({ENV}): {group} rank {fault.rank} raises in call "
                               f"{fault.call} of {fault.method}")
        return getattr(worker_cls, fault.method)(self, *args, **kwargs)

    # The same class name, so the actor's process title (ray::StudentWorker...) stays as the tests expect.
    return type(worker_cls.__name__, (worker_cls,), {fault.method: faulty, "__module__": __name__})
