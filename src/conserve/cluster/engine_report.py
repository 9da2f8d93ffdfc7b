"""The engine-side half of a replica's stats, taken on the engine thread (where the scheduler's queues
and the harvest window may be read safely) after its steps: at most every REFRESH_S, and whenever the
number of requests changed (the step that finishes the last request is never skipped)."""

from __future__ import annotations

import time

from conserve.engine import Engine
from conserve.sched.latency_model import decode_batch
from conserve.server.harvest import predicted_harvest

REFRESH_S = 0.05  # reports are asked for every few hundred ms; steps come every few ms


class EngineReport:
    def __init__(self) -> None:
        self.online_running = 0
        self.online_step_s = 0.0
        self.offline_requests = 0
        self.offline_capacity = 0.0
        self._taken_at = -REFRESH_S
        self._requests = 0

    def update(self, engine: Engine) -> None:
        now = time.monotonic()
        sched = engine.scheduler
        requests = len(sched.running) + len(sched.waiting)
        if now - self._taken_at < REFRESH_S and requests == self._requests:
            return
        self._taken_at, self._requests = now, requests
        online = [r for r in sched.running if r.is_online]
        model = engine.latency_model
        self.online_running = len(online)
        if online and model is not None:
            self.online_step_s = model.predict(decode_batch(len(online), max(r.num_tokens for r in online)))
        else:
            self.online_step_s = 0.0
        self.offline_requests = sum(1 for q in (sched.running, sched.waiting) for r in q if not r.is_online)
        self.offline_capacity = predicted_harvest(engine) or 0.0
