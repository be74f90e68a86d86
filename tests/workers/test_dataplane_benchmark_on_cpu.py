"""benchmarks/dataplane.py --nodes 2 on two local Ray nodes: half of the ranks land on the node without
the driver, and only their shares cross to it (the old path sent each of them the whole batch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_two_nodes_ship_only_the_far_ranks_shares_across(tmp_path):
    out = tmp_path / "figures.json"
    subprocess.run([sys.executable, "dataplane.py", "--nodes", "2", "--ranks", "4", "--batch", "32", "--length", "256",
                    "--k", "8", "--json", str(out)], cwd=BENCHMARKS, check=True, capture_output=True, timeout=540)
    old, new = json.loads(out.read_text())["results"]
    assert old["ranks_off_driver_node"] == new["ranks_off_driver_node"] == 2
    # the far node's two ranks: a whole padded batch each before, their own rows (about half the payload) now
    assert old["cross_node_copies_of_real_payload"] > 2
    assert 0.3 < new["cross_node_copies_of_real_payload"] <= 0.5 * 1.1 + 0.05
