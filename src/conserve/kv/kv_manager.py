"""Block tables: which KV blocks hold which request's tokens. Pure Python: no torch."""

from __future__ import annotations

from conserve.kv.block_pool import BlockPool
from conserve.request import Request


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return self.pool.num_used / self.pool.num_blocks

    def block_table(self, request: Request) -> list[int]:
        return self.block_tables.get(request.request_id, [])

    def num_new_blocks(self, request: Request, num_new_tokens: int) -> int:
        have = len(self.block_tables.get(request.request_id, ()))
        need = blocks_needed(request.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, need - have)

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self.num_new_blocks(request, num_new_tokens) <= self.pool.num_free

    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the request's table to hold num_computed + num_new tokens. False if blocks run out."""
        n = self.num_new_blocks(request, num_new_tokens)
        if n > self.pool.num_free:
            return False
        if n:
            self.block_tables.setdefault(request.request_id, []).extend(self.pool.allocate(n))
        return True

    def free(self, request: Request) -> None:
        blocks = self.block_tables.pop(request.request_id, None)
        if blocks:
            # Free in reverse so the tail blocks (least likely to be shared) are reused first.
            self.pool.free(blocks[::-1])
