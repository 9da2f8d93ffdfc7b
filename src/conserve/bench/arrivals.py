"""Arrival times of online requests: a Gamma renewal process, as `vllm bench serve` draws them.

Inter-arrival gaps are Gamma(shape=burstiness, scale=1 / (rate * burstiness)): the mean gap is always
1 / rate; burstiness 1 is a Poisson process, below 1 burstier (gaps' squared coefficient of variation
is 1 / burstiness), above 1 more regular. An infinite rate sends everything at time 0.
"""

from __future__ import annotations

import math
import random


def inter_arrival_gaps(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """n gaps in seconds, drawn from one seeded generator (same seed, same gaps)."""
    if rate <= 0 or math.isnan(rate):
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, scale) for _ in range(n)]


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times in seconds after the benchmark starts: the first at 0 (as in vLLM), then cumulative gaps."""
    out, t = [], 0.0
    for gap in inter_arrival_gaps(max(n - 1, 0), rate, burstiness, seed):
        out.append(t)
        t += gap
    if n > 0:
        out.append(t)
    return out
