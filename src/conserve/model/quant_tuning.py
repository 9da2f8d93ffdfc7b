"""Decide from measurements, not ISA flags, up to which iteration size quantised matmuls pay.

A weight-only int8/int4 matmul moves fewer weight bytes but spends more arithmetic per weight, so
it wins at a few tokens and loses past some size that depends on the CPU (on an AVX-512/bf16 Zen4
the int4 cross-over against bfloat16 was ~8 tokens; against float32 on an AVX2-only CPU it is
elsewhere). At start-up this times the model's own layer projections and lm_head, dense against
quantised, at growing token counts (well under a second or two), and caches the result per CPU
model, thread count, dtype and weight shapes, so later starts skip it.
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
TUNING_VERSION = 1  # in the cache file name: bump when the measurement changes


@dataclass
class QuantTuning:
    layers_max_tokens: int  # largest iteration that runs quantised projections (0: never)
    lm_head_max_rows: int  # largest number of logit rows that run the quantised lm_head
    # part -> [tokens, dense ms, quantised ms] (median group time x groups: a pass's time without stalls)
    timings_ms: dict[str, list[list[float]]] = field(default_factory=dict)


def cache_file(cache_dir: Path, model: LlamaModel) -> Path:
    pairs = model.layer_projections()
    shapes = [(tuple(d.shape), type(q).__name__) for d, q in pairs]
    if model.lm_head_quant is not None:
        shapes.append(((model.lm_head_quant.out_features, model.lm_head_quant.in_features), "lm_head"))
    sig = hashlib.sha1(f"{torch.__version__}|{shapes}".encode()).hexdigest()[:10]
    dtype = str(model.dtype).removeprefix("torch.")
    return cache_dir / f"quant-{machine_key()}-{torch.get_num_threads()}t-{dtype}-{sig}-v{TUNING_VERSION}.json"


def tune(model: LlamaModel, cache_dir: Path | None) -> QuantTuning:
    """The cached decision for this machine and model, else a fresh measurement (then cached)."""
    path = cache_file(cache_dir, model) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            tuning = QuantTuning(**json.loads(path.read_text()))
            log.info("quantised-matmul cross-over from %s", path)
            return tuning
        except (OSError, ValueError, TypeError):
            log.warning("ignoring unreadable %s", path)
    started = time.perf_counter()
    deadline = started + BUDGET_S
    timings: dict[str, list[list[float]]] = {}
    layers = _crossover(model.layer_groups(), model.dtype, deadline / 2 + started / 2,
                        timings.setdefault("layers", []))
    head = [(model.lm_head, model.lm_head_quant)] if model.lm_head_quant is not None else []
    lm_rows = _crossover([head], model.dtype, deadline, timings.setdefault("lm_head", []))
    tuning = QuantTuning(layers, lm_rows, timings)
    log.info("measured quantised-matmul cross-over in %.2f s: layers up to %d tokens, lm_head up to %d rows",
             time.perf_counter() - started, layers, lm_rows)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(asdict(tuning), indent=1))
        except OSError as e:
            log.warning("cannot cache the quantised-matmul cross-over in %s: %s", path, e)
    return tuning


def _crossover(groups: list[list[tuple[torch.Tensor, QuantWeight]]], dtype: torch.dtype, deadline: float,
               record: list[list[float]]) -> int:
    """Largest size in TOKENS up to which the quantised matmuls beat the dense ones at every size.

    Each group (a layer's projections) is timed on its own, dense and quantised in turn, keeping its
    fastest of a few rounds, and the verdict is the median over groups of quantised / dense: on a
    shared CPU a kernel whose two threads are not both scheduled stalls for a whole time slice, and
    the median ignores the groups that were unlucky every round. Going round the groups keeps their
    weights as cold as in a real forward pass."""
    groups = [g for g in groups if g]
    if not groups:
        return 0
    rounds = ROUNDS if len(groups) > 1 else 3 * ROUNDS
    best = 0
    for tokens in TOKENS:
        inputs = {q.in_features: torch.randn(tokens, q.in_features).to(dtype) for g in groups for _, q in g}
        dense = [float("inf")] * len(groups)
        quantised = [float("inf")] * len(groups)
        with torch.inference_mode():
            for use_quant in (False, True):  # warm-up: first use of a shape allocates and picks kernels
                _time(groups[0], inputs, use_quant)
            for _ in range(rounds):
                for i, group in enumerate(groups):
                    dense[i] = min(dense[i], _time(group, inputs, False))
                    quantised[i] = min(quantised[i], _time(group, inputs, True))
                if time.perf_counter() > deadline:
                    break
        ratio = statistics.median(q / d for q, d in zip(quantised, dense))
        record.append([tokens, round(statistics.median(dense) * len(groups) * 1e3, 3),
                       round(statistics.median(quantised) * len(groups) * 1e3, 3)])
        if ratio >= 1:
            break
        best = tokens
        if time.perf_counter() > deadline:
            break
    return best


def _time(group: list[tuple[torch.Tensor, QuantWeight]], inputs: dict[int, torch.Tensor], use_quant: bool) -> float:
    started = time.perf_counter()
    for dense, q in group:
        linear(inputs[q.in_features], dense, q if use_quant else None)
    return time.perf_counter() - started
