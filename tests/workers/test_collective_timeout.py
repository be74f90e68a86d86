"""The collective timeout of a worker group's process group: the config's value, else $NCCL_TIMEOUT
(seconds), else 30 minutes; read on the driver and carried to every rank."""

import pytest

from opcd.errors import ConfigError
from opcd.workers.distributed import Rendezvous, collective_timeout_s


def test_the_config_wins_then_nccl_timeout_then_30_minutes(monkeypatch):
    """Regression: NCCL_TIMEOUT was never read (60 minutes hard-coded); then the launchers exported
    10 hours, so a run whose rank failed hung for hours (issue 22 §3: 30 minutes by default)."""
    monkeypatch.delenv("NCCL_TIMEOUT", raising=False)
    assert collective_timeout_s() == 1800.0
    monkeypatch.setenv("NCCL_TIMEOUT", "36000")
    assert collective_timeout_s() == 36000.0
    assert collective_timeout_s(90) == 90.0


@pytest.mark.parametrize("value", ["ten", "0", "-5", "inf"])
def test_a_bad_nccl_timeout_is_one_line(monkeypatch, value):
    monkeypatch.setenv("NCCL_TIMEOUT", value)
    with pytest.raises(ConfigError, match=rf"^NCCL_TIMEOUT='{value}': expected a number of seconds"):
        collective_timeout_s()


def test_the_rendezvous_carries_the_timeout_to_the_ranks(monkeypatch):
    monkeypatch.setenv("NCCL_TIMEOUT", "1234")
    rendezvous, store = Rendezvous.create("g")
    assert rendezvous.timeout_s == 1234.0
    assert Rendezvous.create("h", 77.0)[0].timeout_s == 77.0
    del store


def test_a_bad_configured_timeout_is_refused():
    from opcd.config import RayConfig

    with pytest.raises(ConfigError, match=r"^config ray.collective_timeout_s=0: expected a number of seconds"):
        RayConfig(collective_timeout_s=0)


def test_the_launchers_do_not_override_the_default():
    """Regression: scripts/common.sh exported NCCL_TIMEOUT=36000 (10 h) for every launcher."""
    from pathlib import Path

    common = (Path(__file__).resolve().parents[2] / "scripts" / "common.sh").read_text()
    assert "NCCL_TIMEOUT=" not in common
