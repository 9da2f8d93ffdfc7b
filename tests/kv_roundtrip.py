"""Checks that KV comes back from the host tier exactly as it left: the device values of every position
a checkpoint copies, read when the copy is issued, against the device values after a prefetch of those
positions lands. Bitwise, so it holds in any dtype (bfloat16 greedy outputs may differ with the
batching alone; the copies may not)."""

from __future__ import annotations

import torch


class KVRoundTrip:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.sent: dict[str, dict[int, torch.Tensor]] = {}  # request id -> position -> [2L, kv_heads, D]
        self.checked = 0  # positions compared
        offload = engine.offload
        submit, poll = offload._submit, offload.poll

        def submitted(job):
            if job.kind == "checkpoint":
                for seg in job.segments:
                    values = self._read(seg.device_blocks, seg.start, seg.end)
                    sent = self.sent.setdefault(seg.request.request_id, {})
                    for i, p in enumerate(range(seg.start, seg.end)):
                        sent[p] = values[:, :, i]
            submit(job)

        def polled():
            ready = poll()
            for r in ready:
                back = self._read(engine.kv_manager.block_table(r), 0, r.num_computed_tokens)
                sent = self.sent[r.request_id]
                for p in range(r.num_computed_tokens):
                    assert torch.equal(back[:, :, p], sent[p]), f"{r.request_id}: KV at position {p} changed"
                self.checked += r.num_computed_tokens
            return ready

        offload._submit, offload.poll = submitted, polled

    def _read(self, table: list[int], start: int, end: int) -> torch.Tensor:
        bs, store = self.engine.kv_cache.block_size, self.engine.kv_cache.store
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(start, end)], device=store.device)
        return store[:, :, slots].cpu()
