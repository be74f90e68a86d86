"""Third-party messages that every `opcd` run printed and that ask nothing of the user.

- Ray 2.60 turns token authentication on for every new local instance (its default, kept) and logs a
  warning saying so ("Token authentication is enabled for this Ray cluster...") from
  `ray._private.authentication.authentication_token_setup`; setting RAY_AUTH_MODE would silence it
  too but would also change how `ray.address=...` joins a cluster, so only that logger is raised.
- matplotlib logs "generated new fontManager" at INFO whenever it (re)builds its font cache (a fresh
  or unwritable cache folder: every run); opcd's own INFO logging would otherwise show it.
Warnings and errors of both libraries still come through.
- colorama, which Ray's CLI logger initialises on import (`colorama.init(strip=False)`), registers an
  exit hook that writes ESC[0m to the terminal: a stray line after the last output of every run.
  `no_colour_reset_at_exit` unregisters it (Ray bundles its own copy; every loaded copy is covered).
"""

from __future__ import annotations

import atexit
import logging
import sys

QUIETED = {
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    "matplotlib": logging.WARNING,
}


def quiet_third_party_logs() -> None:
    for name, level in QUIETED.items():
        logging.getLogger(name).setLevel(level)


def no_colour_reset_at_exit() -> None:
    for name, module in list(sys.modules.items()):
        if name.endswith("colorama.initialise") and callable(getattr(module, "reset_all", None)):
            atexit.unregister(module.reset_all)
