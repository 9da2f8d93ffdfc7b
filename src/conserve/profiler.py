"""Time the real runner over a grid of iteration shapes and fit the latency model.

It runs the model, so it lives beside the runner, not in sched/. Each grid point builds synthetic
requests whose KV blocks are allocated but hold whatever the cache held before (timing does not
depend on the values), runs one iteration a few times and keeps the median.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from conserve.config import EngineConfig
from conserve.kv.kv_manager import KVCacheManager
from conserve.machine import machine_key
from conserve.model.loader import LoadedModel
from conserve.request import Request
from conserve.runner import ModelRunner
from conserve.sampling_params import SamplingParams
from conserve.sched.latency_model import LatencyModel, Sample, median
from conserve.sched.output import ScheduledRequest, SchedulerOutput

log = logging.getLogger(__name__)


class ProfiledEngine(Protocol):
    """What profiling needs of the engine (engine.py imports this module, not the reverse)."""

    config: EngineConfig
    loaded: LoadedModel
    kv_manager: KVCacheManager
    runner: ModelRunner
    max_model_len: int


def cache_path(cache_dir: Path, model_name: str, dtype: torch.dtype, device: str, quant: str = "") -> Path:
    """One fit per model, dtype, device, thread count, machine (CPU model and ISA, or GPU name) and
    quantised-matmul use (quant, e.g. "int4w8-int8h16"): each changes the timings, and a fit from
    another CPU must never be reused."""
    where = machine_key()
    if device.startswith("cuda") and torch.cuda.is_available():
        where = torch.cuda.get_device_name(torch.device(device)).replace(" ", "_")
    if quant:
        model_name = f"{model_name}-{quant}"
    name = (f"{model_name}-{str(dtype).removeprefix('torch.')}-{device}-{torch.get_num_threads()}t-{where}"
            f"-g{GRID_VERSION}.json")
    return cache_dir / name

GRID_VERSION = 4  # in the cache file name: bump it when the grid below changes, so old fits are not reused
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
PREFILL_CHUNKS = (16, 64, 256, 512, 1024)
# Offline-only iterations may be far larger: whole prompts at once, measured without prior context
# (seconds each; the R term carries context costs over from the smaller chunks).
LARGE_CHUNKS = (2048, 4096, 8192)
CONTEXTS = (64, 512, 2048)  # context per decode request / prior context of a prefill chunk
# Co-serving iterations mix decodes with a prefill chunk: a few such points check additivity.
MIXED = ((4, 64), (16, 256), (32, 64))  # (decodes at 512 context, chunk tokens after 512)


@dataclass(frozen=True)
class Point:
    decodes: int = 0
    decode_context: int = 0  # tokens already in each decode's KV
    chunk: int = 0  # prefill chunk tokens (0: none)
    chunk_context: int = 0  # tokens already computed before the chunk


def grid(max_tokens: int, max_context: int, quick: bool = False) -> list[Point]:
    """Points that fit the engine's token budget and context length."""
    decodes = DECODE_BATCHES[::2] if quick else DECODE_BATCHES
    chunks = PREFILL_CHUNKS[::2] if quick else PREFILL_CHUNKS
    points = [Point(b, c) for b in decodes for c in CONTEXTS if b <= max_tokens and c < max_context]
    points += [Point(chunk=n, chunk_context=c) for n in chunks for c in (0, *CONTEXTS)
               if n <= max_tokens and c + n < max_context]
    large = LARGE_CHUNKS[1::2] if quick else LARGE_CHUNKS
    points += [Point(chunk=n) for n in large if n <= max_tokens and n < max_context]
    points += [Point(b, 512, n, 512) for b, n in MIXED if b + n <= max_tokens and 512 + n < max_context]
    return points


def _synthetic(engine: ProfiledEngine, point: Point) -> SchedulerOutput:
    kv = engine.kv_manager
    out = SchedulerOutput()
    vocab = engine.loaded.config.vocab_size
    work = [(point.decode_context, 1)] * point.decodes + ([(point.chunk_context, point.chunk)] if point.chunk else [])
    for i, (context, new) in enumerate(work):
        length = context + new
        request = Request(f"profile-{i}", [(7 * j + i) % vocab for j in range(length)],
                          SamplingParams(temperature=0, max_tokens=1))
        request.num_computed_tokens = context
        if not kv.allocate(request, new):
            for s in out.scheduled:  # give back what this point already took
                kv.free(s.request)
            kv.free(request)
            raise MemoryError("KV cache too small for this profiling point")
        out.scheduled.append(ScheduledRequest(request, new, kv.block_table(request)))
    return out


def measure(engine: ProfiledEngine, point: Point, repeats: int = 3) -> Sample:
    out = _synthetic(engine, point)
    try:
        engine.runner.execute(out)  # warm-up: first use of a shape allocates
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            engine.runner.execute(out)
            times.append(time.perf_counter() - started)
    finally:
        for s in out.scheduled:
            engine.kv_manager.free(s.request)
    return Sample(out.shape, statistics.median(times))


def profile(engine: ProfiledEngine, quick: bool = False, progress: Callable[[int, int], None] | None = None
            ) -> tuple[LatencyModel, dict]:
    """Measure the grid, fit on every other point, report the error on the held-out rest, then refit
    on everything."""
    config = engine.config
    max_tokens = config.max_num_batched_tokens
    if config.scheduler == "conserve":
        max_tokens = max(max_tokens, config.max_offline_batched_tokens)
    points = grid(max_tokens, engine.max_model_len, quick)
    samples = []
    for i, point in enumerate(points):
        try:
            samples.append(measure(engine, point))
        except MemoryError:
            log.warning("skipping %s: KV cache too small", point)
        if progress is not None:
            progress(i + 1, len(points))
    train, held_out = samples[::2], samples[1::2]
    errors = LatencyModel.fit(train).relative_errors(held_out)
    model = LatencyModel.fit(samples)
    report = {"points": len(samples), "held_out": len(held_out),
              "median_abs_rel_error": median(errors), "max_abs_rel_error": max(errors),
              "samples": [{"P": s.shape.tokens, "D": s.shape.decode_reads, "R": s.shape.prefill_reads,
                          "ms": round(s.seconds * 1000, 3), "predicted_ms": round(model.predict(s.shape) * 1000, 3)}
                         for s in samples]}
    return model, report
