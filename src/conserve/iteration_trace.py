"""An opt-in log of every model run, one JSON line each, for finding out where time goes when
co-serving (which iterations an online request waited behind, how far the latency model was off).

Fields: t (seconds since the engine started), kind (`iteration`: planned and run whole; `stopped`: an
offline-only iteration stopped at a safepoint; `resumed`: a suspended one run on alone; `slack`: some
of its layers run beside online work), s (measured seconds), predicted (the latency model's seconds
for the whole shape, when there is one), on_dec/on_pre/off_dec/off_pre (tokens by class, decodes and
prefill chunks), ctx (the longest context after the step), reqs, layers (layers run, for partial runs).
"""

from __future__ import annotations

import json
import time
from typing import TextIO

from conserve.sched.latency_model import LatencyModel
from conserve.sched.output import SchedulerOutput


class IterationTrace:
    def __init__(self, path: str) -> None:
        self._file: TextIO = open(path, "a", buffering=1)  # line-buffered: a killed server keeps its lines
        self._t0 = time.monotonic()

    def record(self, kind: str, out: SchedulerOutput, seconds: float, model: LatencyModel | None,
               layers: int | None = None) -> None:
        counts = {"on_dec": 0, "on_pre": 0, "off_dec": 0, "off_pre": 0}
        ctx = 0
        for s in out.scheduled:
            decode = s.num_new_tokens == 1 and s.samples
            key = ("on_" if s.request.is_online else "off_") + ("dec" if decode else "pre")
            counts[key] += s.num_new_tokens
            ctx = max(ctx, s.start + s.num_new_tokens)
        line = {"t": round(time.monotonic() - self._t0, 4), "kind": kind, "s": round(seconds, 5),
                "predicted": round(model.predict(out.shape), 5) if model is not None else None,
                **counts, "ctx": ctx, "reqs": len(out.scheduled)}
        if layers is not None:
            line["layers"] = layers
        self._file.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self._file.close()
