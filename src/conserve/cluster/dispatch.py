"""The ingress's side of the replicas: polls their stats into the Router, sends requests and batch lines
where it says, and turns a lost replica into an answer the caller can act on.

Replicas are reached through clients with the EngineReplica methods (RayReplica over Ray Serve handles;
plain objects in tests) that raise ReplicaLost when the replica is gone. A batch line is leased to one
replica while it runs there; if the replica dies under it (or its engine fails), the lease ends with
ReplicaLost, an EngineUnavailable, so the batch runner's EngineRetry runs the line again, and the router
sends it to another replica. The line's answer is committed once, by the batch runner (server/batches.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Protocol

from conserve.cluster.metrics import ClusterMetrics
from conserve.cluster.router import Router
from conserve.cluster.stats import ReplicaStats
from conserve.cluster.wire import Accepted, EngineFault, Head
from conserve.errors import EngineUnavailable
from conserve.request import RequestClass
from conserve.server.errors import APIError

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often each replica is asked for its stats
# A replica that does not answer within this is taken as down until it does: a process that died idle
# is found by this (Ray Serve queues calls to it until its restart), one that died under calls at once.
POLL_TIMEOUT_S = 2.0


class ReplicaLost(EngineUnavailable):
    """The replica's process died under a call, or its engine failed under it."""


class ReplicaClient(Protocol):
    def request(self, endpoint: str, body: dict) -> AsyncIterator[Accepted | Head | str]: ...
    async def execute(self, endpoint: str, body: dict, deadline: float | None) -> tuple[int, dict] | EngineFault: ...
    async def stats(self) -> ReplicaStats: ...
    async def metrics_text(self) -> bytes: ...


class Dispatcher:
    def __init__(self, replicas: dict[str, ReplicaClient], metrics: ClusterMetrics, max_waiting_flex: int = 0,
                 poll_s: float = POLL_S, poll_timeout_s: float = POLL_TIMEOUT_S) -> None:
        """max_waiting_flex: flex requests that may wait here for a replica with room for offline work
        (beyond it: 429; 0: no limit)."""
        self.replicas = replicas
        self.router = Router(list(replicas))
        self.metrics = metrics
        self.max_waiting_flex = max_waiting_flex
        self.poll_s, self.poll_timeout_s = poll_s, poll_timeout_s
        self._flex_waiting = 0
        self._changed: asyncio.Event | None = None  # set (and replaced) after every report
        self._down: dict[str, asyncio.Event] = {}  # per replica, set (and replaced) when it is taken as down
        self._pollers: list[asyncio.Task] = []
        self._closed = False

    # -- stats ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._changed = asyncio.Event()
        self._down = {name: asyncio.Event() for name in self.replicas}
        self._pollers = [asyncio.create_task(self._poll(name), name=f"stats of {name}") for name in self.replicas]

    async def close(self) -> None:
        self._closed = True  # wait_for may swallow a cancel that lands as its call completes (Python < 3.12)
        for task in self._pollers:
            task.cancel()
        await asyncio.gather(*self._pollers, return_exceptions=True)

    async def _poll(self, name: str) -> None:
        while not self._closed:
            asked = time.monotonic()
            try:
                stats = await asyncio.wait_for(self.replicas[name].stats(), self.poll_timeout_s)
            except (ReplicaLost, asyncio.TimeoutError) as e:
                if self.router.is_up(name):
                    log.warning("replica %s is down (%s)", name, type(e).__name__)
                self._mark_down(name)
            else:
                if self.router.report(stats, asked):
                    log.warning("replica %s was restarted (pid %d on %s)", name, stats.pid, stats.node)
                    self.metrics.restarts.labels(name).inc()
            self.metrics.observe(self.router, name)
            self._notify()
            await asyncio.sleep(self.poll_s)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def _offline_replica(self) -> str:
        """The replica offline work goes to now; waits while none can take it."""
        held = False
        while True:
            name = self.router.choose_offline()
            if name is not None:
                return name
            if not held:
                held = True
                self.metrics.offline_held.inc()
            await self._changed.wait()

    def _mark_down(self, name: str) -> None:
        """No new work goes there until it reports again; requests it has not accepted go elsewhere."""
        self.router.lost(name)
        if name in self._down:
            self._down[name].set()
            self._down[name] = asyncio.Event()

    def _lost(self, name: str, e: BaseException) -> None:
        log.warning("replica %s lost under a call: %s", name, e)
        self._mark_down(name)
        self.metrics.lost.labels(name).inc()
        self.metrics.observe(self.router, name)

    # -- HTTP requests -------------------------------------------------------------------------------
    async def open(self, endpoint: str, body: dict, request_class: RequestClass, prompt_tokens: int) -> Answer:
        """Send a request where the router says; returns once its Head is in. A replica that goes down
        before it accepted the request (a process that died before anyone knew) never began it: the
        request goes to the next choice. Raises APIError 503 when no replica can take it or the one that
        accepted it is lost before answering (429: too many flex requests waiting)."""
        for _ in range(len(self.replicas)):
            answer = await self._send(endpoint, body, request_class, prompt_tokens)
            if await self._accepted(answer):
                break
        else:
            raise _no_replica()
        try:
            answer.head = await anext(answer.items)
        except BaseException as e:
            await answer.close()
            if isinstance(e, ReplicaLost):
                self._lost(answer.replica, e)
                raise replica_lost_error(answer.replica) from None
            raise
        return answer

    async def _send(self, endpoint: str, body: dict, request_class: RequestClass, prompt_tokens: int) -> Answer:
        if not self.router.any_up():
            raise _no_replica()
        online = request_class is RequestClass.ONLINE
        if online:
            name = self.router.choose_online(prompt_tokens)
            predicted = self.router.predicted_ttft(name, prompt_tokens)
            if predicted is not None:
                self.metrics.predicted_ttft.labels(name).observe(predicted)
            self.router.sent_online(name, prompt_tokens)
        else:
            name = await self._wait_for_flex_replica()
            self.router.sent_offline(name)
        self.metrics.routed.labels(name, request_class.value, "http").inc()
        return Answer(self, name, self.replicas[name].request(endpoint, body), offline=not online)

    async def _accepted(self, answer: Answer) -> bool:
        """Wait for the replica to accept the request; False (the call ended) when it went down first."""
        first = asyncio.ensure_future(anext(answer.items))
        down = asyncio.ensure_future(self._down[answer.replica].wait())
        try:
            try:
                await asyncio.wait({first, down}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # the call's generator must be still before it can be closed
                for task in (first, down):
                    task.cancel()
                await asyncio.gather(first, down, return_exceptions=True)
        except BaseException:
            await answer.close()
            raise
        if first.cancelled():
            log.warning("replica %s went down before accepting a request; sending it elsewhere", answer.replica)
            await answer.close()
            return False
        error = first.exception()
        if isinstance(error, ReplicaLost):
            self._lost(answer.replica, error)
            await answer.close()
            return False
        if error is not None or not isinstance(first.result(), Accepted):
            await answer.close()
            raise error or RuntimeError(f"replica {answer.replica} answered before accepting the request")
        return True

    async def _wait_for_flex_replica(self) -> str:
        if self.max_waiting_flex and self._flex_waiting >= self.max_waiting_flex:
            raise APIError(429, f"too many flex requests waiting for room on a replica ({self._flex_waiting}, "
                           f"limit {self.max_waiting_flex}); retry later", code="queue_full",
                           headers={"Retry-After": "1"})
        self._flex_waiting += 1
        try:
            return await self._offline_replica()
        finally:
            self._flex_waiting -= 1

    # -- batch lines ---------------------------------------------------------------------------------
    async def execute_line(self, endpoint: str, body: dict, deadline: float | None) -> tuple[int, dict]:
        """The batch runner's `execute`: lease the line to the replica with the most harvestable capacity.
        Raises ReplicaLost when the lease ends without an answer (the runner runs the line again)."""
        name = await self._offline_replica()
        self.router.sent_offline(name)
        self.metrics.routed.labels(name, RequestClass.OFFLINE.value, "batch_line").inc()
        self.metrics.leased.labels(name).inc()
        try:
            answer = await self.replicas[name].execute(endpoint, body, deadline)
            if isinstance(answer, EngineFault):
                raise ReplicaLost(f"the engine of replica {name} failed under the line: {answer.message}")
        except ReplicaLost as e:
            self._lost(name, e)
            self.metrics.released.labels(name).inc()
            raise
        finally:
            self.router.offline_done(name)
            self.metrics.leased.labels(name).dec()
        return answer

    def harvest_capacity(self) -> float | None:
        return self.router.harvest_capacity()

    # -- for /metrics --------------------------------------------------------------------------------
    async def replica_metrics(self) -> dict[str, bytes]:
        """Each up replica's own Prometheus text (the ones that do not answer in time are left out)."""
        async def one(name: str) -> bytes | None:
            with contextlib.suppress(ReplicaLost, asyncio.TimeoutError):
                return await asyncio.wait_for(self.replicas[name].metrics_text(), self.poll_timeout_s)
            return None

        names = [n for n in self.replicas if self.router.is_up(n)]
        texts = await asyncio.gather(*(one(n) for n in names))
        return {n: t for n, t in zip(names, texts) if t is not None}


class Answer:
    """A request's answer from its replica: the Head, then (when it streams) lines(). close() ends the
    call (at the replica too, if it is still running) and its place in the router's offline count; it
    must be called however the answer ends, even when lines() never started (a client gone at once)."""

    def __init__(self, dispatcher: Dispatcher, replica: str, items: AsyncIterator[Head | str], offline: bool) -> None:
        self.replica, self.items, self.head = replica, items, None
        self._dispatcher, self._offline, self._closed = dispatcher, offline, False

    async def lines(self) -> AsyncIterator[str]:
        """The SSE lines after the Head; raises ReplicaLost when the replica dies mid-stream."""
        try:
            async for line in self.items:
                yield line
        except ReplicaLost as e:
            self._dispatcher._lost(self.replica, e)
            raise
        finally:
            await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._offline:
            self._dispatcher.router.offline_done(self.replica)
        await self.items.aclose()


def _no_replica() -> APIError:
    return APIError(503, "no engine replica is up; retry later", code="no_replica_available",
                     headers={"Retry-After": "1"})


def replica_lost_error(name: str) -> APIError:
    """The answer to a request whose replica died under it (in-band when its stream had begun)."""
    return APIError(503, f"the engine replica serving this request ({name}) failed; retry (other replicas "
                    "take new requests)", code="replica_lost", headers={"Retry-After": "1"})
