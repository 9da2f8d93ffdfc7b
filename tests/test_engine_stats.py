"""EngineStats: the harvest counters behind /metrics. Pure Python, fake iterations."""

from types import SimpleNamespace

import pytest

import conserve.stats as stats_module
from conserve.stats import RATE_WINDOW_S, EngineStats


def iteration(online: int, offline: int):
    scheduled = [SimpleNamespace(num_new_tokens=online, request=SimpleNamespace(is_online=True)),
                 SimpleNamespace(num_new_tokens=offline, request=SimpleNamespace(is_online=False))]
    return SimpleNamespace(scheduled=scheduled, num_tokens=online + offline)


def test_harvest_rate_and_time_share_and_bounded_memory(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(stats_module.time, "monotonic", lambda: clock[0])
    stats = EngineStats()
    for _ in range(10_000):  # nobody reads the rate meanwhile: the window still forgets old entries
        stats.on_iteration(iteration(online=1, offline=3), seconds=0.1)
        clock[0] += 1.0
    assert len(stats._recent) <= RATE_WINDOW_S + 1
    assert stats.offline_tokens == 30_000 and stats.online_tokens == 10_000
    assert stats.offline_time_fraction == pytest.approx(0.75)  # time split by token share
    stats.on_partial(seconds=1000.0)  # an offline-only run's layers: all offline time
    assert stats.offline_time_fraction == pytest.approx((750 + 1000) / 2000)
    assert stats.offline_tokens_per_s() == pytest.approx(3.0)  # 3 offline tokens a second
    clock[0] += 2 * RATE_WINDOW_S
    assert stats.offline_tokens_per_s() == 0


def test_harvest_rate_for_estimates_counts_from_when_offline_work_began(monkeypatch):
    clock = [500.0]
    monkeypatch.setattr(stats_module.time, "monotonic", lambda: clock[0])
    stats = EngineStats()
    assert stats.harvest_rate() is None  # nothing measured: no rate, rather than a zero
    for _ in range(5):  # 2 s of offline work at 40 tokens per 0.5 s, after a long idle spell
        stats.on_iteration(iteration(online=0, offline=40), seconds=0.5)
        clock[0] += 0.5
    assert stats.harvest_rate() == pytest.approx(4 * 40 / 2.5)  # not diluted over the 10 s window
    assert stats.offline_tokens_per_s() == pytest.approx(200 / RATE_WINDOW_S)
    stats.on_iteration(iteration(online=10, offline=0), seconds=2.0)  # online work: 2 s of the last 10
    assert stats.online_time_share() == pytest.approx(0.2)
    clock[0] += 2 * RATE_WINDOW_S
    assert stats.harvest_rate() is None and stats.online_time_share() == 0
