"""A fitted model of one iteration's time from the batch's shape. Pure Python at prediction time.

An iteration's shape (`IterationShape`) is what its cost depends on:
- P, tokens processed (prefill-chunk plus decode tokens): the matmuls, with a knee at small P;
- D, decode attention reads: decodes x the longest decode context where decode attention is padded to
  the longest context in the batch (`--attention gather`, CUDA), the sum of the decode contexts where
  the paged kernel reads each request's own blocks (`padded_decode` says which);
- R, prefill attention reads: the sum over prefill chunks of chunk length x context after the chunk;
- K, prefill chunks after context: each runs its own attention per layer (a gather of its context, a
  masked call),
  a fixed cost that made a few offline prompt tokens beside one online decode cost +40%, not the +3%
  a per-token cost alone predicts.
The fit is least squares over features (1, P, P², D, R, P·D, K), weighted by 1/T so that relative error
counts (a 14 ms decode step and a 1 s prefill alike), with every coefficient kept >= 0 so predictions
grow with work (the scheduler binary-searches chunk sizes on that). A single "C = total context"
feature was tried first: held-out median error 6-10%, but 50% on prefill chunks after a long context,
whose attention costs far more per KV entry than a decode's. Splitting D and R: 7% median, 19% max.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

FEATURES = ("1", "P", "P^2", "D", "R", "P*D", "K")
CORRECTION_RATE = 0.05  # smoothing of the measured/predicted correction: ~20 iterations
# Live iterations this far off the fit, this many in a row, mean the fit no longer describes the
# machine (another CPU, other load, another engine build): refit at once rather than wait.
DRIFT_RATIO = 0.25
DRIFT_WINDOW = 32


@dataclass
class IterationShape:
    tokens: int = 0  # P
    num_decodes: int = 0
    max_decode_context: int = 0
    prefill_reads: int = 0  # R
    num_chunks: int = 0  # K: prefill chunks (steps of more than one token) that follow earlier context
    decode_context_sum: int = 0  # the decodes' contexts added up (what the paged kernel reads)

    @property
    def decode_reads(self) -> int:  # D, padded
        return self.num_decodes * self.max_decode_context

    def add(self, num_new: int, context_after: int) -> None:
        """Account one scheduled request: num_new tokens computed, context_after tokens in its KV after."""
        self.tokens += num_new
        if num_new == 1:  # the runner runs single-token steps as decodes
            self.num_decodes += 1
            self.max_decode_context = max(self.max_decode_context, context_after)
            self.decode_context_sum += context_after
        else:
            self.prefill_reads += num_new * context_after
            if context_after > num_new:  # a chunk after context: gathered and masked (a prompt's start is not)
                self.num_chunks += 1

    def plus(self, num_new: int, context_after: int) -> IterationShape:
        # The scheduler asks this a few times per request per iteration: a plain copy, not
        # dataclasses.replace (~10x slower), keeps planning 64 decodes well under a millisecond.
        other = IterationShape(self.tokens, self.num_decodes, self.max_decode_context, self.prefill_reads,
                               self.num_chunks, self.decode_context_sum)
        other.add(num_new, context_after)
        return other

    def features(self, padded: bool = True) -> list[float]:
        p, d = float(self.tokens), float(self.decode_reads if padded else self.decode_context_sum)
        return [1.0, p, p * p, d, float(self.prefill_reads), p * d, float(self.num_chunks)]

    def to_json(self) -> list[int]:
        return [self.tokens, self.num_decodes, self.max_decode_context, self.prefill_reads, self.num_chunks,
                self.decode_context_sum]

    @classmethod
    def from_json(cls, data: list[int]) -> IterationShape:
        return cls(*(int(v) for v in data))


def decode_batch(batch: int, context: int) -> IterationShape:
    """`batch` decodes, each with `context` tokens in its KV after the step."""
    return IterationShape(tokens=batch, num_decodes=batch, max_decode_context=context,
                          decode_context_sum=batch * context)


def prefill_chunk(tokens: int, context_after: int) -> IterationShape:
    return IterationShape().plus(tokens, context_after)


def prefill_seconds(model: LatencyModel, prompt_tokens: int, chunk_tokens: int) -> float:
    """Predicted seconds to prefill a prompt alone, in chunks of at most chunk_tokens."""
    seconds, done = 0.0, 0
    while done < prompt_tokens:
        chunk = min(chunk_tokens, prompt_tokens - done)
        done += chunk
        seconds += model.predict(prefill_chunk(chunk, done))
    return seconds


@dataclass
class Sample:
    shape: IterationShape
    seconds: float


def _fit(samples: list[Sample], padded: bool = True) -> list[float]:
    """Weighted least squares with non-negative coefficients: drop the most negative feature, refit."""
    import numpy as np

    x = np.array([s.shape.features(padded) for s in samples])
    y = np.array([s.seconds for s in samples])
    w = 1.0 / np.maximum(y, 1e-6)
    active = list(range(len(FEATURES)))
    while True:
        coef, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        worst = int(np.argmin(coef))
        if coef[worst] >= 0 or len(active) == 1:
            break
        del active[worst]
    full = [0.0] * len(FEATURES)
    for i, v in zip(active, coef):
        full[i] = max(0.0, float(v))
    return full


@dataclass
class LatencyModel:
    coefficients: list[float]
    # The profiled grid: refits always include it, so a stretch of same-shaped serving iterations
    # cannot bend the model away from shapes it has not seen lately.
    base: list[Sample] = field(default_factory=list, repr=False)
    # Recent observations from serving (bounded: memory stays constant).
    recent: deque = field(default_factory=lambda: deque(maxlen=1024), repr=False)
    num_observed: int = 0
    # Measured / predicted, smoothed over recent iterations: serving costs what profiling did not see
    # (HTTP streaming on the same cores, output handling). Corrects every prediction between refits.
    correction: float = 1.0
    drift_refits: int = 0  # refits triggered by sustained drift (the engine logs the first)
    # Decode attention padded to the longest context (gather) or reading each request's own blocks
    # (the paged kernel): set by the engine for its runner; the profile grid fits either way (its
    # decode batches share one context).
    padded_decode: bool = True
    _drifting: int = field(default=0, repr=False)  # consecutive observations off the fit by > DRIFT_RATIO

    def __post_init__(self) -> None:
        # Coefficients written for fewer features (hand-made models in tests) leave the rest at 0.
        self.coefficients = list(self.coefficients) + [0.0] * (len(FEATURES) - len(self.coefficients))

    def predict(self, shape: IterationShape) -> float:
        """Predicted seconds for an iteration of this shape (never below 0)."""
        return self.correction * self._fitted(shape)

    def _fitted(self, shape: IterationShape) -> float:
        return max(0.0, sum(w * x for w, x in zip(self.coefficients, shape.features(self.padded_decode))))

    @classmethod
    def fit(cls, samples: Iterable[Sample]) -> LatencyModel:
        samples = list(samples)
        if len(samples) < len(FEATURES):
            raise ValueError(f"need at least {len(FEATURES)} samples to fit, got {len(samples)}")
        return cls(_fit(samples), base=samples)

    def observe(self, shape: IterationShape, seconds: float, refit_every: int = 256) -> bool:
        """Record a measured iteration; every refit_every observations, refit on the profiled grid
        plus the recent observations. Returns whether it refitted."""
        self.recent.append(Sample(shape, seconds))
        self.num_observed += 1
        fitted = self._fitted(shape)
        drifted = False
        if fitted > 0:
            ratio = min(4.0, max(0.25, seconds / fitted))  # one outlier (a GC pause) moves it little
            self.correction += CORRECTION_RATE * (ratio - self.correction)
            self._drifting = self._drifting + 1 if abs(ratio - 1) > DRIFT_RATIO else 0
            drifted = self._drifting >= DRIFT_WINDOW
        if self.num_observed % refit_every and not drifted:
            return False
        if drifted:
            self._drifting = 0
            self.drift_refits += 1
        samples = self.base + list(self.recent)
        if len(samples) < 2 * len(FEATURES):
            return False
        self.coefficients = _fit(samples, self.padded_decode)
        # The refit has absorbed the recent costs: start the correction over from the new fit's bias.
        recent = [s for s in self.recent if self._fitted(s.shape) > 0][-64:]
        if recent:
            self.correction = sum(s.seconds / self._fitted(s.shape) for s in recent) / len(recent)
        return True

    def portable(self) -> LatencyModel:
        """The model as it predicts now (correction folded into the coefficients), without its samples:
        small enough to send to another process with every stats report."""
        return LatencyModel([c * self.correction for c in self.coefficients], padded_decode=self.padded_decode)

    def relative_errors(self, samples: Iterable[Sample]) -> list[float]:
        return [abs(self._fitted(s.shape) - s.seconds) / s.seconds for s in samples]

    # -- persistence ---------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"features": list(FEATURES), "coefficients": self.coefficients,
                "base": [{"shape": s.shape.to_json(), "seconds": s.seconds} for s in self.base]}

    @classmethod
    def from_json(cls, data: dict) -> LatencyModel:
        if data.get("features") != list(FEATURES):
            raise ValueError(f"latency model features {data.get('features')} differ from {list(FEATURES)} "
                             f"(written by another version: profile again)")
        coef = [float(v) for v in data["coefficients"]]
        if len(coef) != len(FEATURES) or not all(math.isfinite(v) for v in coef):
            raise ValueError("latency model coefficients are malformed")
        base = [Sample(IterationShape.from_json(s["shape"]), float(s["seconds"])) for s in data.get("base", [])]
        return cls(coef, base=base)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # replicas on one machine may profile at once
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> LatencyModel:
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a latency model: {e}") from e


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
