"""Third-party messages that every `opcd` run printed and that ask nothing of the user.

- Ray 2.60 turns token authentication on for every new local instance (its default, kept) and logs a
  warning saying so ("Token authentication is enabled for this Ray cluster...") from
  `ray._private.authentication.authentication_token_setup`; setting RAY_AUTH_MODE would silence it
  too but would also change how `ray.address=...` joins a cluster, so only that logger is raised.
- matplotlib logs "generated new fontManager" at INFO whenever it (re)builds its font cache (a fresh
  or unwritable cache folder: every run); opcd's own INFO logging would otherwise show it.
Warnings and errors of both libraries still come through.
"""

from __future__ import annotations

import logging

QUIETED = {
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    "matplotlib": logging.WARNING,
}


def quiet_third_party_logs() -> None:
    for name, level in QUIETED.items():
        logging.getLogger(name).setLevel(level)
