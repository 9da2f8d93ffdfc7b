"""ErrorTail: the quantile of measured / predicted that offline fill is planned against. No torch."""

import pytest

from conserve.sched.error_tail import FACTOR_RANGE, MIN_SAMPLES, ErrorTail


def test_no_estimate_until_enough_iterations_were_seen():
    tail = ErrorTail(0.99)
    for _ in range(MIN_SAMPLES - 1):
        tail.observe(0.12, 0.1)
    assert tail.factor() is None
    tail.observe(0.12, 0.1)
    assert tail.factor() == pytest.approx(1.2)


def test_the_factor_is_the_quantile_of_the_ratios():
    tail = ErrorTail(0.9)
    for i in range(100):  # ratios 1.00 .. 1.99, in scrambled order
        tail.observe(1.0 + ((37 * i) % 100) / 100, 1.0)
    assert tail.factor() == pytest.approx(1.90)


def test_old_iterations_leave_the_window():
    tail = ErrorTail(0.99, window=64)
    for _ in range(64):
        tail.observe(3.0, 1.0)  # a slow stretch
    assert tail.factor() == pytest.approx(3.0)
    for _ in range(64):
        tail.observe(1.1, 1.0)  # the machine recovered
    assert len(tail) == 64
    assert tail.factor() == pytest.approx(1.1)


def test_the_factor_is_clamped_and_meaningless_samples_are_ignored():
    tail = ErrorTail(0.5)
    for _ in range(MIN_SAMPLES):
        tail.observe(10.0, 0.1)  # 100x: a stall
        tail.observe(0.1, 0.0)  # no prediction
        tail.observe(-1.0, 0.1)  # a clock that went backwards
    assert len(tail) == MIN_SAMPLES
    assert tail.factor() == FACTOR_RANGE[1]


@pytest.mark.parametrize("quantile", [0.0, 1.0, -0.5, 1.5])
def test_the_quantile_must_be_inside_the_unit_interval(quantile):
    with pytest.raises(ValueError, match="quantile"):
        ErrorTail(quantile)
