"""Harvest-aware routing over engine replicas. Pure Python: decisions from the replicas' reports.

Online requests go to the replica with the lowest predicted time to first token: the prefill of the
online prompts waiting there (reported) plus one step of its running online decodes plus the
newcomer's own prefill, all from that replica's latency model. Requests sent since its last report
are added on top, so a burst between two reports spreads out instead of piling onto one replica.

Offline work (flex requests and batch lines) goes where harvestable capacity is largest: the offline
tokens/s a replica could give offline work now (its latency model's offline throughput times the share
of time online work leaves it), divided among the offline calls already in flight there. A replica
whose online objectives are at risk (stats.online_risk) gets none; when every replica is at risk,
offline work waits.

A replica is up from a report saying its engine serves until a call to it fails (or its report says
otherwise); a restarted replica (a new started_at) counts a restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from conserve.cluster.stats import ReplicaStats
from conserve.sched.latency_model import prefill_seconds

# A request sent this long before a report was asked for may not have reached the replica's queue when
# it answered: it stays counted here until the next report (counted twice briefly, never missed).
PENDING_GRACE_S = 0.1


@dataclass
class _Replica:
    name: str
    stats: ReplicaStats | None = None
    up: bool = False
    pending: list[tuple[float, float]] = field(default_factory=list)  # (sent at, predicted prefill s), online
    offline: int = 0  # offline calls in flight there (batch line leases and flex requests)
    restarts: int = 0
    lost_at: float = float("-inf")  # when a call last found it gone: reports asked for before say nothing


class Router:
    def __init__(self, names: list[str], clock: Callable[[], float] = time.monotonic) -> None:
        if not names:
            raise ValueError("a router needs at least one replica")
        self._replicas = {n: _Replica(n) for n in names}
        self._clock = clock

    @property
    def names(self) -> list[str]:
        return list(self._replicas)

    def any_up(self) -> bool:
        return any(r.up for r in self._replicas.values())

    def is_up(self, name: str) -> bool:
        return self._replicas[name].up

    # -- what the replicas say -----------------------------------------------------------------------
    def report(self, stats: ReplicaStats, asked_at: float) -> bool:
        """A replica's report, asked for at `asked_at` (this router's clock). Returns whether it comes
        from a restarted process."""
        r = self._replicas[stats.name]
        if asked_at < r.lost_at:  # from before the loss: its process may be the dead one
            return False
        restarted = r.stats is not None and stats.started_at != r.stats.started_at
        if restarted:
            r.restarts += 1
        r.stats, r.up = stats, stats.serving
        r.pending = [(t, s) for t, s in r.pending if t >= asked_at - PENDING_GRACE_S]
        return restarted

    def lost(self, name: str) -> None:
        """A call to the replica failed (its process died, or its engine under the call): no new work
        goes there until a report says it serves again."""
        r = self._replicas[name]
        r.up = False
        r.pending.clear()
        r.lost_at = self._clock()

    # -- decisions -----------------------------------------------------------------------------------
    def predicted_ttft(self, name: str, prompt_tokens: int) -> float | None:
        """Seconds to the first token of a prompt of this many tokens sent there now (None: no report
        or no latency model yet)."""
        r = self._replicas[name]
        s = r.stats
        if s is None or s.latency_model is None:
            return None
        queue = max(s.online_queue_s, 0.0) + sum(p for _, p in r.pending)
        return queue + s.online_step_s + prefill_seconds(s.latency_model, prompt_tokens, s.chunk_tokens)

    def choose_online(self, prompt_tokens: int) -> str | None:
        """The up replica with the lowest predicted TTFT (fewest online requests where none can be
        predicted); None when no replica is up."""
        def key(r: _Replica):
            ttft = self.predicted_ttft(r.name, prompt_tokens)
            s = r.stats
            load = len(r.pending) + (s.online_waiting + s.online_running if s is not None else 0)
            return (ttft if ttft is not None else float("inf"), load, r.name)

        up = [r for r in self._replicas.values() if r.up]
        return min(up, key=key).name if up else None

    def choose_offline(self) -> str | None:
        """The up replica, its online objectives not at risk, with the most harvestable capacity per
        offline call in flight; None when there is none (offline work waits)."""
        def key(r: _Replica):
            capacity = r.stats.offline_capacity or 1.0  # unknown: share evenly
            return (-capacity / (1 + r.offline), r.offline, r.name)

        ok = [r for r in self._replicas.values() if r.up and r.stats is not None and r.stats.at_risk is None]
        return min(ok, key=key).name if ok else None

    # -- what was sent -------------------------------------------------------------------------------
    def sent_online(self, name: str, prompt_tokens: int) -> None:
        r = self._replicas[name]
        s = r.stats
        if s is not None and s.latency_model is not None:
            r.pending.append((self._clock(), prefill_seconds(s.latency_model, prompt_tokens, s.chunk_tokens)))

    def sent_offline(self, name: str) -> None:
        self._replicas[name].offline += 1

    def offline_done(self, name: str) -> None:
        self._replicas[name].offline -= 1

    # -- for /replicas and /metrics ----------------------------------------------------------------
    def offline_in_flight(self, name: str) -> int:
        return self._replicas[name].offline

    def stats(self, name: str) -> ReplicaStats | None:
        return self._replicas[name].stats

    def restarts(self, name: str) -> int:
        return self._replicas[name].restarts

    def harvest_capacity(self) -> float | None:
        """Offline tokens/s the up replicas could harvest together (None: none reported one)."""
        rates = [r.stats.offline_capacity for r in self._replicas.values()
                 if r.up and r.stats is not None and r.stats.offline_capacity > 0]
        return sum(rates) if rates else None
