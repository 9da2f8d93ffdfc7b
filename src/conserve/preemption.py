"""Layer-wise preemption: stop an offline-only iteration between layers when an online request arrives.

The front end calls `online_arrival` (any thread) as it hands an online request to the engine. The
engine thread gives the runner a safepoint for iterations without online work; every k layers it
checks, in microseconds, whether an online request arrived after the iteration was planned. Only
then does it ask the latency model whether waiting for the iteration to end would break the new
request's objectives: the rest of the iteration plus its prefill past the TTFT objective, or the
rest alone past the TBT objective (an online request should not wait on offline work longer than
an online iteration would hold it). That question matters only when a stop throws the iteration's
work away ("layer-restart"); a suspended iteration resumes where it stopped ("layer", see
Engine._stopped), so then every arrival stops it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from conserve.layer_progress import LayerProgress
from conserve.sched.config import SchedulerConfig
from conserve.sched.latency_model import LatencyModel, prefill_chunk

# layer: stop at a safepoint and resume from the next layer later (nothing computed is lost);
# layer-restart: stop and compute the iteration again later; iteration: never stop mid-iteration.
PREEMPTION_MODES = ("layer", "layer-restart", "iteration")


class LayerPreemption:
    def __init__(self, config: SchedulerConfig, latency_model: LatencyModel | None, every: int = 1,
                 keeps_work: bool = True) -> None:
        if every < 1:
            raise ValueError(f"safepoint_every must be >= 1, got {every}")
        self.config = config
        self.latency_model = latency_model
        self.every = every
        self.keeps_work = keeps_work  # a stop loses nothing: always worth it
        self.arrivals = 0  # online arrivals so far (written by the front end only)
        self._last_arrival = (0.0, 0)  # (monotonic time, prompt tokens) of the latest one
        self.num_preemptions = 0
        self.latencies: deque[float] = deque(maxlen=4096)  # arrival -> safepoint reached, seconds

    def online_arrival(self, num_prompt_tokens: int) -> None:
        self._last_arrival = (time.monotonic(), num_prompt_tokens)
        self.arrivals += 1

    def online_within(self, seconds: float) -> bool:
        """Whether an online request arrived in the last `seconds`."""
        return self.arrivals > 0 and time.monotonic() - self._last_arrival[0] < seconds

    def safepoint(self, seen: int, first_layer: int, num_layers: int,
                  progress: LayerProgress | None = None) -> Callable[[int], bool]:
        """For an offline-only run of layers first_layer.. planned when `seen` arrivals had happened.
        progress: how far the device has got (layer_progress.py); None: as far as the host."""
        every = self.every
        started = time.monotonic()

        def check(layer: int) -> bool:
            if (layer + 1) % every or self.arrivals == seen:
                return False
            done = progress.layers_done() if progress is not None else layer + 1 - first_layer
            return self._worth_stopping(started, done, num_layers - first_layer - done)

        return check

    def _worth_stopping(self, started: float, layers_done: int, layers_left: int) -> bool:
        if self.keeps_work or self.latency_model is None:
            return True
        # The rest of the run at the device's pace over the layers it has finished: a measurement,
        # right even when the latency model is off (another process on the cores, a cold cache).
        remaining = (time.monotonic() - started) / max(layers_done, 1) * layers_left
        _, prompt = self._last_arrival
        prefill = self.latency_model.predict(prefill_chunk(prompt, prompt))
        return remaining > self.config.slo_tbt_s or remaining + prefill > self.config.slo_ttft_s

    def stopped(self) -> None:
        """The runner stopped at a safepoint and the device has finished the layers issued: record
        how long the arrival waited for it."""
        self.num_preemptions += 1
        self.latencies.append(time.monotonic() - self._last_arrival[0])
