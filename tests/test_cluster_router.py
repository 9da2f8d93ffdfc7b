"""Harvest-aware routing from replica reports, pure Python: online to the lowest predicted TTFT (bursts
between reports spread), offline to the most harvestable capacity per call in flight, never to a replica
whose online objectives are at risk, and nothing to a lost replica until it reports again."""

from __future__ import annotations

from conftest import rough_latency_model
from conserve.cluster.router import PENDING_GRACE_S, Router
from conserve.cluster.stats import ReplicaStats, online_risk


def stats(name: str, **kw) -> ReplicaStats:
    kw = {"pid": 1, "node": "n", "started_at": 1.0, "serving": True, "slo_ttft_s": 1.0, "slo_tbt_s": 0.1,
          "chunk_tokens": 1024, "latency_model": rough_latency_model(), "offline_capacity": 100.0, **kw}
    return ReplicaStats(name=name, **kw)


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def router(*reports: ReplicaStats, clock=None) -> Router:
    r = Router([s.name for s in reports], clock or Clock())
    for s in reports:
        r.report(s, asked_at=0.0)
    return r


def test_online_goes_to_the_lowest_predicted_ttft():
    r = router(stats("a", online_queue_s=0.4), stats("b", online_queue_s=0.1), stats("c", online_step_s=0.3))
    assert r.choose_online(100) == "b"
    assert r.predicted_ttft("b", 100) < r.predicted_ttft("c", 100) < r.predicted_ttft("a", 100)
    assert r.predicted_ttft("a", 800) > r.predicted_ttft("a", 100)  # the newcomer's own prefill counts


def test_a_burst_between_reports_spreads_and_a_report_replaces_what_was_sent():
    clock = Clock()
    r = router(stats("a"), stats("b"), clock=clock)
    chosen = []
    for _ in range(4):
        name = r.choose_online(200)
        r.sent_online(name, 200)
        chosen.append(name)
    assert sorted(chosen) == ["a", "a", "b", "b"]
    # A report asked for after those were sent covers them (they no longer count twice); one sent just
    # before it was asked for may not have reached the replica's queue yet, so it still counts.
    before = r.predicted_ttft("a", 200)
    clock.now += 1
    r.sent_online("b", 200)
    r.report(stats("a"), asked_at=clock.now + PENDING_GRACE_S / 2)
    r.report(stats("b"), asked_at=clock.now + PENDING_GRACE_S / 2)
    assert r.predicted_ttft("a", 200) < before
    assert r.predicted_ttft("b", 200) > r.predicted_ttft("a", 200) and r.choose_online(200) == "a"


def test_offline_goes_where_capacity_per_call_in_flight_is_largest():
    r = router(stats("a", offline_capacity=300.0), stats("b", offline_capacity=100.0))
    sent = []
    for _ in range(4):
        name = r.choose_offline()
        r.sent_offline(name)
        sent.append(name)
    assert sent == ["a", "a", "b", "a"]  # 300/1 > 100/1, 300/2 > 100/1, 100/1 > 300/3, 300/3 > 100/2
    r.offline_done("a")
    assert r.offline_in_flight("a") == 2


def test_no_offline_work_where_online_objectives_are_at_risk():
    r = router(stats("a", offline_capacity=500.0, online_queue_s=0.9), stats("b", online_step_s=0.095))
    assert r.stats("a").at_risk == "ttft" and r.stats("b").at_risk == "tbt"
    assert r.choose_offline() is None  # every replica at risk: offline work waits
    r.report(stats("b", online_step_s=0.02), asked_at=0.0)
    assert r.choose_offline() == "b"
    assert r.choose_online(10) in ("a", "b")  # online work is never held back by risk


def test_risk_thresholds():
    assert online_risk(0.49, 0.0, 1.0, 0.1) is None and online_risk(0.51, 0.0, 1.0, 0.1) == "ttft"
    assert online_risk(0.0, 0.089, 1.0, 0.1) is None and online_risk(0.0, 0.091, 1.0, 0.1) == "tbt"


def test_a_lost_replica_gets_nothing_until_it_reports_and_a_new_process_counts_a_restart():
    clock = Clock()
    r = router(stats("a", online_queue_s=0.5), stats("b"), clock=clock)
    r.lost("b")
    assert not r.is_up("b") and r.choose_online(10) == "a" and r.choose_offline() == "a"
    r.lost("a")
    assert not r.any_up() and r.choose_online(10) is None and r.choose_offline() is None
    assert not r.report(stats("a"), asked_at=clock.now - 1) and not r.is_up("a")  # asked before the loss
    clock.now += 1
    assert not r.report(stats("b"), asked_at=clock.now) and r.restarts("b") == 0  # same process, back
    assert r.report(stats("a", started_at=2.0), asked_at=clock.now) and r.restarts("a") == 1
    assert r.is_up("a") and r.is_up("b")
    r.report(stats("a", started_at=2.0, serving=False), asked_at=clock.now)  # its engine is restarting
    assert not r.is_up("a")


def test_replicas_without_a_latency_model_share_online_work_by_load():
    r = router(stats("a", latency_model=None, online_running=2), stats("b", latency_model=None))
    assert r.predicted_ttft("a", 10) is None and r.choose_online(10) == "b"
    assert r.harvest_capacity() == 200.0
