"""Batch lines through engine faults: wait for the engine to come back, run the line again, and find
the line that keeps killing it.

A line in flight when the engine fails has no answer yet, so it is run again rather than committed as
failed. Most faults are not the fault of any one line (every line in flight sees them), so a line's
first retry runs beside the others; from then on it runs alone (no other batch line in the engine),
which pins a fault on it rather than on its neighbours. A line that has seen `max_faults` faults (the
last ones alone) is committed as failed with a server_error, so a poison line is not retried forever.
Fault counts live in memory: a server restart starts them afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from conserve.errors import EngineUnavailable
from conserve.server.errors import error_body

log = logging.getLogger(__name__)

ALONE_AFTER = 2  # faults after which a line runs alone


def is_engine_fault(e: BaseException) -> bool:
    """Whether `e` says the engine failed (or is restarting, or its replica is gone) under the request,
    not that the request is bad."""
    return isinstance(e, EngineUnavailable)


class EngineRetry:
    """engine_ready: whether the engine can take requests now (None: assume it can); lines wait for it
    before every attempt, so a restart in progress does not use up their attempts. max_faults=1 turns
    retries off (a fault fails the line at once)."""

    def __init__(self, engine_ready: Callable[[], bool] | None = None, max_faults: int = 3,
                 delay_s: float = 0.5, max_delay_s: float = 30.0, poll_s: float = 0.25) -> None:
        if max_faults < 1:
            raise ValueError("max_faults must be >= 1")
        self.engine_ready = engine_ready
        self.max_faults = max_faults
        self.delay_s, self.max_delay_s, self.poll_s = delay_s, max_delay_s, poll_s
        self._gate = _AloneGate()

    async def run(self, attempt: Callable[[], Awaitable[tuple[int, dict]]], label: str) -> tuple[int, dict]:
        """(status, body) of `attempt`, run again after each engine fault; other errors propagate."""
        faults = 0
        while True:
            await self._engine_back(faults)
            try:
                async with (self._gate.alone() if faults >= ALONE_AFTER else self._gate.together()):
                    return await attempt()
            except Exception as e:
                if not is_engine_fault(e):
                    raise
                faults += 1
                if faults >= self.max_faults:
                    log.error("%s: the engine failed under it %d times; committed as failed", label, faults)
                    return 500, error_body(500, f"the engine failed {faults} times while running this request, "
                                           f"so it was not run again (last error: {e})", code="engine_error")
                log.warning("%s: the engine failed under it (%s); it runs again once the engine is back", label, e)

    async def _engine_back(self, faults: int) -> None:
        if faults:
            await asyncio.sleep(min(self.delay_s * 2 ** (faults - 1), self.max_delay_s))
        while self.engine_ready is not None and not self.engine_ready():
            await asyncio.sleep(self.poll_s)


class _AloneGate:
    """Lets lines run together, or one line alone: a line waiting to run alone holds off new lines
    until those running have ended."""

    def __init__(self) -> None:
        self._together = 0  # lines running together
        self._alone = False  # a line running alone
        self._queued_alone = 0  # lines waiting to run alone
        self._waiters: list[asyncio.Future] = []

    @contextlib.asynccontextmanager
    async def together(self) -> AsyncIterator[None]:
        await self._wait(lambda: not self._alone and not self._queued_alone)
        self._together += 1
        try:
            yield
        finally:
            self._together -= 1
            self._wake()

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        self._queued_alone += 1
        try:
            await self._wait(lambda: not self._alone and not self._together)
        finally:
            self._queued_alone -= 1
            self._wake()  # cancelled while queued: lines held off by it may go
        self._alone = True
        try:
            yield
        finally:
            self._alone = False
            self._wake()

    async def _wait(self, ready: Callable[[], bool]) -> None:
        while not ready():
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
