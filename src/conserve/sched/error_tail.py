"""The tail of the latency model's error on co-served iterations. Pure Python.

The latency model predicts an iteration's mean time; an online request's P99 time between tokens is
set by the slow end. When offline work fills every iteration with online decodes up to the TBT
objective, nearly every online token sees such an iteration, so the objective holds at P99 only if
the fill is planned against the P99 of measured/predicted, not against the mean plus a fixed margin.
On a CPU that spread is wide (measured on a 2-core EPYC: p50 1.05, p90 1.24, p99 1.48 for iterations
with online decodes and offline prefill) and differs by machine, so it is measured live.
"""

from __future__ import annotations

import bisect
from collections import deque

MIN_SAMPLES = 32  # fewer than this: no estimate (the scheduler keeps its fixed margin)
FACTOR_RANGE = (0.5, 4.0)  # one stalled stretch must not close offline work out entirely


class ErrorTail:
    """A quantile of measured / predicted seconds over the last `window` observed iterations."""

    def __init__(self, quantile: float, window: int = 512) -> None:
        if not 0 < quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        self.quantile = quantile
        self._recent: deque[float] = deque()
        self._sorted: list[float] = []
        self._window = window

    def observe(self, measured_s: float, predicted_s: float) -> None:
        if not predicted_s > 0 or not measured_s >= 0:
            return
        ratio = measured_s / predicted_s
        self._recent.append(ratio)
        bisect.insort(self._sorted, ratio)
        if len(self._recent) > self._window:
            old = self._recent.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]

    def __len__(self) -> int:
        return len(self._recent)

    def factor(self) -> float | None:
        """The quantile of measured / predicted (clamped to FACTOR_RANGE), or None while fewer than
        MIN_SAMPLES iterations were seen."""
        n = len(self._sorted)
        if n < MIN_SAMPLES:
            return None
        value = self._sorted[min(n - 1, int(self.quantile * n))]
        return min(FACTOR_RANGE[1], max(FACTOR_RANGE[0], value))
