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
MIN_RATE_SPAN_S = 1.0  # a rate measured over less than this is noise, not a rate


@dataclass
class EngineStats:
    iterations: int = 0
    online_tokens: int = 0
    offline_tokens: int = 0
    busy_s: float = 0.0  # time in model runs
    offline_busy_s: float = 0.0
    resumed: int = 0  # suspended iterations that resumed and committed
    layers_discarded: int = 0  # layers of stopped iterations thrown away (preemption "layer-restart")
    # (monotonic time, offline tokens, online seconds) of recent model runs
    _recent: deque = field(default_factory=deque, repr=False)

    def on_iteration(self, out, seconds: float) -> None:
        """A whole iteration ran and committed."""
        self.iterations += 1
        offline, total = self._count_tokens(out)
        self.busy_s += seconds
        online_s = seconds
        if total:
            self.offline_busy_s += seconds * offline / total
            online_s = seconds * (total - offline) / total
        self._remember(offline, online_s)

    def on_partial(self, seconds: float) -> None:
        """Some layers of an offline-only iteration ran; its tokens count when it commits (on_tokens)."""
        self.busy_s += seconds
        self.offline_busy_s += seconds

    def on_tokens(self, out) -> tuple[int, int]:
        """A suspended iteration committed: its tokens count now (its time was counted in pieces)."""
        offline, total = self._count_tokens(out)
        self._remember(offline, 0.0)
        return offline, total

    def _count_tokens(self, out) -> tuple[int, int]:
        offline = sum(s.num_new_tokens for s in out.scheduled if not s.request.is_online)
        total = out.num_tokens
        self.offline_tokens += offline
        self.online_tokens += total - offline
        return offline, total

    def _remember(self, offline: int, online_s: float) -> None:
        if offline or online_s:
            now = time.monotonic()
            self._recent.append((now, offline, online_s))
            self._forget_before(now - RATE_WINDOW_S)  # bounded even when nobody reads the rate

    def offline_tokens_per_s(self, now: float | None = None) -> float:
        """Offline tokens committed per second over the last RATE_WINDOW_S seconds."""
        self._forget_before((time.monotonic() if now is None else now) - RATE_WINDOW_S)
        return sum(n for _, n, _ in self._recent) / RATE_WINDOW_S

    def harvest_rate(self, now: float | None = None) -> float | None:
        """Offline tokens per second while offline work runs: over the last RATE_WINDOW_S seconds, or
        since the first offline commit in it when work began more recently (a batch that started 2 s
        ago is not diluted by 8 idle seconds). None when too little was measured to tell."""
        now = time.monotonic() if now is None else now
        self._forget_before(now - RATE_WINDOW_S)
        times = [t for t, n, _ in self._recent if n]
        if not times:
            return None
        span = now - times[0]
        if len(times) < 2 or span < MIN_RATE_SPAN_S:
            return None
        # The first commit's tokens were computed before `span` began.
        first = next(n for _, n, _ in self._recent if n)
        return (sum(n for _, n, _ in self._recent) - first) / span

    def online_time_share(self, now: float | None = None) -> float:
        """Share of the last RATE_WINDOW_S seconds of wall time spent computing online work."""
        now = time.monotonic() if now is None else now
        self._forget_before(now - RATE_WINDOW_S)
        return min(1.0, sum(s for _, _, s in self._recent) / RATE_WINDOW_S)

    def _forget_before(self, cutoff: float) -> None:
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()

    @property
    def offline_time_fraction(self) -> float:
        return self.offline_busy_s / self.busy_s if self.busy_s else 0.0
