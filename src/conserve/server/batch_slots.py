"""Concurrency slots handed out by priority: the batch lines allowed into the engine at once.

A plain semaphore wakes waiters in arrival order, so a batch created first would hold every slot and a
later batch with a nearer deadline could not get its lines into the engine, where the scheduler would
put them first. Here a freed slot goes to the waiter with the smallest key.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools


class PrioritySlots:
    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError("n must be >= 1")
        self._free = n
        self._waiters: list[tuple[object, int, asyncio.Future]] = []
        self._seq = itertools.count()  # ties in arrival order

    async def acquire(self, key) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (key, next(self._seq), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted just as it was cancelled: pass the slot on
            raise  # a cancelled waiter stays in the heap and is skipped when reached

    def release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1
