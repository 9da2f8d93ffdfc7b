"""Host-memory block tables for checkpointed KV. Pure Python: no torch.

The i-th host block of a request holds the same tokens as its i-th device block, so a copy between
the tiers maps token position p to the same offset in either table. When the pool runs out, the
checkpoints of preempted requests are dropped, oldest first; those requests recompute on resume.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

from conserve.kv.block_pool import BlockPool
from conserve.kv.kv_manager import blocks_needed
from conserve.request import Request


class HostKVManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.tables: dict[str, list[int]] = {}
        self._started: dict[str, int] = {}  # when each checkpoint began: eviction goes oldest first
        self._clock = itertools.count()

    def block_table(self, request: Request) -> list[int]:
        return self.tables.get(request.request_id, [])

    def reserve(self, request: Request, num_tokens: int, evictable: Callable[[], Iterable[Request]]) -> bool:
        """Grow the request's host table to hold num_tokens, dropping the oldest evictable checkpoints
        if needed (evictable() is only asked when the pool is full). False if it still does not fit."""
        table = self.tables.get(request.request_id, [])
        need = blocks_needed(num_tokens, self.block_size) - len(table)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            victims = sorted((r for r in evictable() if r is not request and r.request_id in self.tables),
                             key=lambda r: self._started[r.request_id])
            for victim in victims:
                if need <= self.pool.num_free:
                    break
                self.drop(victim)
            if need > self.pool.num_free:
                return False
        if request.request_id not in self.tables:
            self.tables[request.request_id] = table
            self._started[request.request_id] = next(self._clock)
        table.extend(self.pool.allocate(need))
        return True

    def drop(self, request: Request) -> None:
        """Forget the request's checkpoint (finished, aborted, or evicted for space)."""
        table = self.tables.pop(request.request_id, None)
        self._started.pop(request.request_id, None)
        if table:
            self.pool.free(table)
        request.num_checkpoint_issued = request.num_checkpointed = 0
        request.checkpoint_epoch += 1

    @property
    def usage(self) -> float:
        return self.pool.num_used / self.pool.num_blocks
