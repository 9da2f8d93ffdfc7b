"""Decide from measurements, not ISA flags, up to which iteration size quantised matmuls pay.

A weight-only int8/int4 matmul moves fewer weight bytes but spends more arithmetic per weight, so
it wins at a few tokens and loses past some size that depends on the CPU (on an AVX-512/bf16 Zen4
the int4 cross-over against bfloat16 was ~8 tokens; against float32 on an AVX2-only CPU it is
elsewhere). At start-up this times the model's own layer projections and lm_head, dense against
quantised, at growing token counts (well under a second or two), and caches the result per CPU
model, thread count, dtype and weight shapes, so later starts skip the full measurement.

A measurement taken while the CPU was busy (or before the weights were ever touched: page faults on
~100 MB cost more than the matmuls) can decide wrongly, and a cached wrong answer would stay forever:
one such file kept this machine's single stream dense at half its speed. So every weight is touched
before timing, a measurement cut short by its budget before two full rounds is not cached, and a
cached answer is re-checked at one token at each start (~20 ms): if the verdict flips, it is measured
again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from conserve.machine import machine_key
from conserve.model.llama import LlamaModel, linear
from conserve.model.quant import QuantWeight

log = logging.getLogger(__name__)

TOKENS = (1, 2, 4, 8, 16, 32, 64)  # iteration sizes tried, smallest first
ROUNDS = 3  # times each group is timed; the fastest counts: other processes only ever add time
BUDGET_S = 2.0  # stop measuring larger sizes after this long (keeps what was decided so far)
TUNING_VERSION = 2  # in the cache file name: bump when the measurement changes
MIN_ROUNDS = 2  # rounds a size needs before its verdict is trusted enough to cache


@dataclass
class QuantTuning:
    layers_max_tokens: int  # largest iteration that runs quantised projections (0: never)
    lm_head_max_rows: int  # largest number of logit rows that run the quantised lm_head
    # part -> [tokens, dense ms, quantised ms] (median group time x groups: a pass's time without stalls)
    timings_ms: dict[str, list[list[float]]] = field(default_factory=dict)
    settled: bool = True  # every verdict had MIN_ROUNDS rounds (else the answer is used but not cached)


def cache_file(cache_dir: Path, model: LlamaModel) -> Path:
    pairs = model.layer_projections()
    # The dense side's kind too (oneDNN-packed or conserve's panels): the cross-over moves with it.
    shapes = [(tuple(d.shape), type(d).__name__, type(q).__name__) for d, q in pairs]
    if model.lm_head_quant is not None:
        shapes.append(((model.lm_head_quant.out_features, model.lm_head_quant.in_features), "lm_head"))
    sig = hashlib.sha1(f"{torch.__version__}|{shapes}".encode()).hexdigest()[:10]
    dtype = str(model.dtype).removeprefix("torch.")
    return cache_dir / f"quant-{machine_key()}-{torch.get_num_threads()}t-{dtype}-{sig}-v{TUNING_VERSION}.json"


def tune(model: LlamaModel, cache_dir: Path | None) -> QuantTuning:
    """The cached decision for this machine and model if it still holds, else a fresh measurement
    (cached when it was not cut short)."""
    path = cache_file(cache_dir, model) if cache_dir is not None else None
    cached = _read(path) if path is not None else None
    if cached is not None:
        if _one_token_verdict_holds(model, cached):
            log.info("quantised-matmul cross-over from %s", path)
            return cached
        log.warning("the cached quantised-matmul cross-over in %s no longer holds at one token: measuring again",
                    path)
    started = time.perf_counter()
    deadline = started + BUDGET_S
    timings: dict[str, list[list[float]]] = {}
    layers, layers_settled = _crossover(model.layer_groups(), model.dtype, deadline / 2 + started / 2,
                                        timings.setdefault("layers", []))
    lm_rows, lm_settled = _crossover([_lm_head_group(model)], model.dtype, deadline,
                                     timings.setdefault("lm_head", []))
    tuning = QuantTuning(layers, lm_rows, timings, layers_settled and lm_settled)
    log.info("measured quantised-matmul cross-over in %.2f s: layers up to %d tokens, lm_head up to %d rows%s",
             time.perf_counter() - started, layers, lm_rows,
             "" if tuning.settled else " (cut short by a busy CPU: used, not cached)")
    if path is not None and tuning.settled:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(asdict(tuning), indent=1))
        except OSError as e:
            log.warning("cannot cache the quantised-matmul cross-over in %s: %s", path, e)
    return tuning


def _read(path: Path) -> QuantTuning | None:
    if not path.is_file():
        return None
    try:
        return QuantTuning(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        log.warning("ignoring unreadable %s", path)
        return None


def _lm_head_group(model: LlamaModel) -> list[tuple[torch.Tensor, QuantWeight]]:
    return [(model.lm_head, model.lm_head_quant)] if model.lm_head_quant is not None else []


def _one_token_verdict_holds(model: LlamaModel, cached: QuantTuning) -> bool:
    """Whether quantised layer projections still win (or still lose) at one token, as cached."""
    groups = [g for g in model.layer_groups() if g]
    if not groups:
        return True
    inputs = _inputs(groups, 1, model.dtype)
    with torch.inference_mode():
        _touch(groups, inputs)
        ratio = _ratio(groups, inputs, MIN_ROUNDS, deadline=float("inf"))[0]
    return (ratio < 1) == (cached.layers_max_tokens >= 1)


def _crossover(groups: list[list[tuple[torch.Tensor, QuantWeight]]], dtype: torch.dtype, deadline: float,
               record: list[list[float]]) -> tuple[int, bool]:
    """Largest size in TOKENS up to which the quantised matmuls beat the dense ones at every size,
    and whether every verdict had MIN_ROUNDS rounds.

    Each group (a layer's projections) is timed on its own, dense and quantised in turn, keeping its
    fastest of a few rounds, and the verdict is the median over groups of quantised / dense: on a
    shared CPU a kernel whose two threads are not both scheduled stalls for a whole time slice, and
    the median ignores the groups that were unlucky every round. Going round the groups keeps their
    weights as cold as in a real forward pass."""
    groups = [g for g in groups if g]
    if not groups:
        return 0, True
    rounds = ROUNDS if len(groups) > 1 else 3 * ROUNDS
    best = 0
    settled = True
    for tokens in TOKENS:
        inputs = _inputs(groups, tokens, dtype)
        with torch.inference_mode():
            _touch(groups, inputs)
            ratio, dense_s, quant_s, done = _ratio(groups, inputs, rounds, deadline)
        settled = settled and done >= MIN_ROUNDS
        record.append([tokens, round(dense_s * 1e3, 3), round(quant_s * 1e3, 3)])
        if ratio >= 1:
            break
        best = tokens
        if time.perf_counter() > deadline:
            break
    return best, settled


def _inputs(groups: list[list[tuple[torch.Tensor, QuantWeight]]], tokens: int,
            dtype: torch.dtype) -> dict[int, torch.Tensor]:
    return {q.in_features: torch.randn(tokens, q.in_features).to(dtype) for g in groups for _, q in g}


def _touch(groups: list[list[tuple[torch.Tensor, QuantWeight]]], inputs: dict[int, torch.Tensor]) -> None:
    """One untimed pass over every group, both ways: pages every weight in and lets the kernels pick
    their code for these shapes."""
    for group in groups:
        for use_quant in (False, True):
            _time(group, inputs, use_quant)


def _ratio(groups: list[list[tuple[torch.Tensor, QuantWeight]]], inputs: dict[int, torch.Tensor], rounds: int,
           deadline: float) -> tuple[float, float, float, int]:
    """Median over groups of quantised / dense (fastest of the rounds), the median pass times in
    seconds (median group x groups), and how many rounds ran before the deadline."""
    dense = [float("inf")] * len(groups)
    quantised = [float("inf")] * len(groups)
    done = 0
    for _ in range(rounds):
        for i, group in enumerate(groups):
            dense[i] = min(dense[i], _time(group, inputs, False))
            quantised[i] = min(quantised[i], _time(group, inputs, True))
        done += 1
        if time.perf_counter() > deadline:
            break
    ratio = statistics.median(q / d for q, d in zip(quantised, dense))
    return ratio, statistics.median(dense) * len(groups), statistics.median(quantised) * len(groups), done


def _time(group: list[tuple[torch.Tensor, QuantWeight]], inputs: dict[int, torch.Tensor], use_quant: bool) -> float:
    started = time.perf_counter()
    for dense, q in group:
        linear(inputs[q.in_features], dense, q if use_quant else None)
    return time.perf_counter() - started
