"""Admission control and the engine supervisor's backoff, without a model."""

from __future__ import annotations

import pytest

from conserve.async_engine import restart_delay
from conserve.request import RequestClass
from conserve.server.admission import QUEUE_FULL, TTFT, Admission, AdmissionLimits, Rejected

ONLINE, OFFLINE = RequestClass.ONLINE, RequestClass.OFFLINE


def per_token(seconds: float):
    return lambda tokens: tokens * seconds


def test_count_limit_per_class_and_release():
    adm = Admission(AdmissionLimits(2, 1, ttft_factor=0), per_token(0.001))
    tickets = adm.admit(ONLINE, [10]) + adm.admit(ONLINE, [10])
    with pytest.raises(Rejected) as e:
        adm.admit(ONLINE, [10])
    assert e.value.reason == QUEUE_FULL and int(e.value.retry_after_header) >= 1
    flex = adm.admit(OFFLINE, [10])  # the other class has its own limit
    with pytest.raises(Rejected):
        adm.admit(OFFLINE, [10])
    tickets[0].release()
    tickets[0].release()  # idempotent
    assert adm.waiting[ONLINE] == 1
    adm.admit(ONLINE, [10])
    flex[0].release()
    assert adm.waiting[OFFLINE] == 0


def test_several_prompts_are_admitted_all_or_nothing():
    adm = Admission(AdmissionLimits(3, 3, ttft_factor=0), per_token(0.001))
    held = adm.admit(ONLINE, [5, 5])  # noqa: F841 - a dropped ticket gives its place back
    with pytest.raises(Rejected):
        adm.admit(ONLINE, [5, 5])
    assert adm.waiting[ONLINE] == 2


def test_zero_means_no_count_limit():
    adm = Admission(AdmissionLimits(0, 0, ttft_factor=0), per_token(0.001))
    held = [adm.admit(ONLINE, [1]) for _ in range(1000)]
    assert len(held) == 1000 and adm.waiting[ONLINE] == 1000


def test_predicted_ttft_bound_counts_online_prompts_ahead():
    # 1 ms per prompt token, bound 2 x 1 s: 2000 tokens of online prefill may wait.
    adm = Admission(AdmissionLimits(0, 0, ttft_factor=2.0, slo_ttft_s=1.0), per_token(0.001))
    first = adm.admit(ONLINE, [1500])
    with pytest.raises(Rejected) as e:
        adm.admit(ONLINE, [600])
    assert e.value.reason == TTFT and e.value.retry_after == pytest.approx(0.1)
    flex = adm.admit(OFFLINE, [100_000])  # offline is never held to the TTFT bound, nor counted ahead of online
    more = adm.admit(ONLINE, [400])
    first[0].release()
    assert flex and more and adm.admit(ONLINE, [1500])


def test_a_dropped_ticket_gives_its_place_back():
    adm = Admission(AdmissionLimits(1, 1, ttft_factor=0), per_token(0.001))
    adm.admit(ONLINE, [1])  # e.g. a streamed response whose body never started
    assert adm.waiting[ONLINE] == 0 and adm.queued_s[ONLINE] == 0.0


def test_a_request_alone_is_never_turned_away_for_its_predicted_ttft():
    adm = Admission(AdmissionLimits(0, 0, ttft_factor=1.0, slo_ttft_s=1.0), per_token(1.0))
    alone = adm.admit(ONLINE, [50])  # predicted 50 s, but nothing is ahead of it
    with pytest.raises(Rejected):
        adm.admit(ONLINE, [1])
    alone[0].release()
    assert adm.admit(ONLINE, [50])


def test_ttft_bound_off_and_without_latency_model():
    off = Admission(AdmissionLimits(0, 0, ttft_factor=0), per_token(1.0))
    no_model = Admission(AdmissionLimits(0, 0, ttft_factor=1.0), lambda tokens: None)
    for adm in (off, no_model):
        held = [adm.admit(ONLINE, [10_000]) for _ in range(3)]
        assert len(held) == 3


def test_bad_limits_are_refused():
    with pytest.raises(ValueError):
        AdmissionLimits(-1, 0)
    with pytest.raises(ValueError):
        AdmissionLimits(1, 1, ttft_factor=-1)


def test_restart_backoff_doubles_and_is_capped():
    assert [restart_delay(k, 0.5, cap_s=3.0) for k in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
