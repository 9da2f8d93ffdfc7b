"""Running totals of what the engine computed, by request class: the harvest, measured. Pure Python.

Tokens count computed positions (prompt chunks and decodes) when an iteration commits; time counts
every model run, an iteration's time split between the classes by their share of its tokens
(offline-only runs, including the pieces of a suspended iteration, count wholly as offline).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

RATE_WINDOW_S = 10.0  # harvested tokens/s is measured over this window


@dataclass
class EngineStats:
    iterations: int = 0
    online_tokens: int = 0
    offline_tokens: int = 0
    busy_s: float = 0.0  # time in model runs
    offline_busy_s: float = 0.0
    resumed: int = 0  # suspended iterations that resumed and committed
    layers_discarded: int = 0  # layers of stopped iterations thrown away (preemption "layer-restart")
    _recent: deque = field(default_factory=deque, repr=False)  # (monotonic time, offline tokens)

    def on_iteration(self, out, seconds: float) -> None:
        """A whole iteration ran and committed."""
        self.iterations += 1
        offline, total = self.on_tokens(out)
        self.busy_s += seconds
        if total:
            self.offline_busy_s += seconds * offline / total

    def on_partial(self, seconds: float) -> None:
        """Some layers of an offline-only iteration ran; its tokens count when it commits (on_tokens)."""
        self.busy_s += seconds
        self.offline_busy_s += seconds

    def on_tokens(self, out) -> tuple[int, int]:
        offline = sum(s.num_new_tokens for s in out.scheduled if not s.request.is_online)
        total = out.num_tokens
        self.offline_tokens += offline
        self.online_tokens += total - offline
        if offline:
            now = time.monotonic()
            self._recent.append((now, offline))
            self._forget_before(now - RATE_WINDOW_S)  # bounded even when nobody reads the rate
        return offline, total

    def offline_tokens_per_s(self, now: float | None = None) -> float:
        """Offline tokens committed per second over the last RATE_WINDOW_S seconds."""
        self._forget_before((time.monotonic() if now is None else now) - RATE_WINDOW_S)
        return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def _forget_before(self, cutoff: float) -> None:
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()

    @property
    def offline_time_fraction(self) -> float:
        return self.offline_busy_s / self.busy_s if self.busy_s else 0.0
