"""Time the real runner over a grid of iteration shapes and fit the latency model T(P, C).

It runs the model, so it lives beside the runner, not in sched/. Each grid point builds synthetic
requests whose KV blocks are allocated but hold whatever the cache held before (timing does not
depend on the values), runs one iteration a few times and keeps the median.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

from conserve.engine import Engine
from conserve.request import Request
from conserve.sampling_params import SamplingParams
from conserve.sched.latency_model import LatencyModel, Sample, median
from conserve.sched.output import ScheduledRequest, SchedulerOutput

log = logging.getLogger(__name__)

# Decode batches (P requests of one token each) and prefill chunks (one request, P new tokens).
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
PREFILL_CHUNKS = (16, 64, 256, 512, 1024)
CONTEXTS = (64, 512, 2048)  # context per decode request / prior context of a prefill chunk


def grid(max_tokens: int, max_context: int, quick: bool = False) -> list[tuple[str, int, int]]:
    """(kind, tokens, context-per-request) points that fit the engine's budget and context."""
    decodes = DECODE_BATCHES[::2] if quick else DECODE_BATCHES
    chunks = PREFILL_CHUNKS[::2] if quick else PREFILL_CHUNKS
    points = [("decode", b, c) for b in decodes for c in CONTEXTS if b <= max_tokens and c < max_context]
    points += [("prefill", n, c) for n in chunks for c in (0, *CONTEXTS) if n <= max_tokens and c + n < max_context]
    return points


def _synthetic(engine: Engine, kind: str, tokens: int, context: int) -> SchedulerOutput:
    kv = engine.kv_manager
    out = SchedulerOutput()
    count, new = (tokens, 1) if kind == "decode" else (1, tokens)
    vocab = engine.loaded.config.vocab_size
    for i in range(count):
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


def measure(engine: Engine, kind: str, tokens: int, context: int, repeats: int = 3) -> Sample:
    out = _synthetic(engine, kind, tokens, context)
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
    p = sum(s.num_new_tokens for s in out.scheduled)
    c = sum(s.start + s.num_new_tokens for s in out.scheduled)
    return Sample(p, c, statistics.median(times))


def profile(engine: Engine, quick: bool = False, progress: Callable[[int, int], None] | None = None
            ) -> tuple[LatencyModel, dict]:
    """Measure the grid, fit on every other point, report the error on the held-out rest, then refit
    on everything."""
    points = grid(engine.config.max_num_batched_tokens, engine.max_model_len, quick)
    samples = []
    for i, (kind, tokens, context) in enumerate(points):
        try:
            samples.append(measure(engine, kind, tokens, context))
        except MemoryError:
            log.warning("skipping %s P=%d context=%d: KV cache too small", kind, tokens, context)
        if progress is not None:
            progress(i + 1, len(points))
    train, held_out = samples[::2], samples[1::2]
    errors = LatencyModel.fit(train).relative_errors(held_out)
    model = LatencyModel.fit(samples)
    report = {"points": len(samples), "held_out": len(held_out),
              "median_abs_rel_error": median(errors), "max_abs_rel_error": max(errors),
              "samples": [{"P": s.p, "C": s.c, "ms": round(s.seconds * 1000, 3)} for s in samples]}
    return model, report
