"""The collective timeout of a worker group's process group: the config's value, else $NCCL_TIMEOUT
(which the launchers export), else an hour; read on the driver and carried to every rank."""

import pytest

from opcd.errors import ConfigError
from opcd.workers.distributed import Rendezvous, collective_timeout_s


def test_the_config_wins_then_nccl_timeout_then_an_hour(monkeypatch):
    """Regression: NCCL_TIMEOUT exported by the launchers was never read (60 minutes hard-coded)."""
    monkeypatch.delenv("NCCL_TIMEOUT", raising=False)
    assert collective_timeout_s() == 3600.0
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
