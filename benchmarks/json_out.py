"""Where the benchmark scripts write their figures as JSON (`--json PATH`, '-' for stdout)."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(data, dest: str) -> None:
    text = json.dumps(data, indent=2)
    if dest == "-":
        print(text)
    else:
        Path(dest).write_text(text + "\n")
