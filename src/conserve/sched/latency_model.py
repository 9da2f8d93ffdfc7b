"""A fitted model of one iteration's time, T(P, C). Pure Python at prediction time: no torch.

P is the number of tokens the iteration processes (prefill-chunk plus decode tokens), C the total KV
context its attention reads: the sum over scheduled requests of their context length after the step.
(Counting each token's reads instead, so that a prefill chunk counts P times its context, was tried:
decode and prefill attention cost so differently per read on CPU that the held-out median error
rose from 6% to 20%; the P*C feature carries prefill-with-context well enough.) The fit is least squares over a few features (a fixed cost, P, C, P²,
P·C): enough to follow the matmul knee at small P and attention's growth with C, small enough to fit
from a coarse profiling grid. The co-serving scheduler asks it "how long would this batch take?".
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

FEATURES = ("1", "P", "C", "P^2", "P*C")


def features(p: float, c: float) -> list[float]:
    return [1.0, p, c, p * p, p * c]


@dataclass
class Sample:
    p: int
    c: int
    seconds: float


@dataclass
class LatencyModel:
    coefficients: list[float]
    # Recent observations from serving, used to refine the fit (bounded: memory stays constant).
    recent: deque = field(default_factory=lambda: deque(maxlen=2048), repr=False)

    def predict(self, p: float, c: float) -> float:
        """Predicted seconds for an iteration of p tokens reading c context tokens (never below 0)."""
        return max(0.0, sum(w * x for w, x in zip(self.coefficients, features(p, c))))

    @classmethod
    def fit(cls, samples: Iterable[Sample]) -> LatencyModel:
        import numpy as np

        samples = list(samples)
        if len(samples) < len(FEATURES):
            raise ValueError(f"need at least {len(FEATURES)} samples to fit, got {len(samples)}")
        x = np.array([features(s.p, s.c) for s in samples])
        y = np.array([s.seconds for s in samples])
        # Relative error matters (a 2 ms decode step and a 2 s prefill alike): weight rows by 1/y.
        w = 1.0 / np.maximum(y, 1e-6)
        coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
        return cls([float(v) for v in coef])

    def observe(self, p: int, c: int, seconds: float, refit_every: int = 256) -> bool:
        """Record a measured iteration; every refit_every observations, refit on the recent ones.
        Returns whether it refitted."""
        self.recent.append(Sample(p, c, seconds))
        if len(self.recent) % refit_every or len(self.recent) < 4 * len(FEATURES):
            return False
        # Only refit when the observations span enough shapes to determine every coefficient.
        if len({(s.p, s.c) for s in self.recent}) < 2 * len(FEATURES):
            return False
        self.coefficients = LatencyModel.fit(self.recent).coefficients
        return True

    def relative_errors(self, samples: Iterable[Sample]) -> list[float]:
        return [abs(self.predict(s.p, s.c) - s.seconds) / s.seconds for s in samples]

    # -- persistence ---------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"features": list(FEATURES), "coefficients": self.coefficients}

    @classmethod
    def from_json(cls, data: dict) -> LatencyModel:
        if data.get("features") != list(FEATURES):
            raise ValueError(f"latency model features {data.get('features')} differ from {list(FEATURES)}")
        coef = [float(v) for v in data["coefficients"]]
        if len(coef) != len(FEATURES) or not all(math.isfinite(v) for v in coef):
            raise ValueError("latency model coefficients are malformed")
        return cls(coef)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> LatencyModel:
        return cls.from_json(json.loads(path.read_text()))


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
