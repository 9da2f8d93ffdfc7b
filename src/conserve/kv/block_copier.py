"""Copies whole KV blocks between the device cache and a pinned host tier, asynchronously.

A checkpoint of n blocks is one gather on the device (the blocks of every layer, through
KVCache.block_view) into a staging buffer, then one asynchronous copy into the host tier per run of
consecutive host blocks; a prefetch is the reverse (copies in, one scatter). No host-side scatter:
the host tier is laid out in whole blocks, so the device writes it directly, and a job is complete
when the event recorded after its ops has completed. Everything runs on a CopyQueue (copy_queue.py):
a side stream on CUDA.

The rules that make this correct with a device that runs behind the host:
- every tensor an op touches (the block indices, their pinned source, the staging buffer, the caches)
  stays referenced by the job's `_InFlight` until its event has completed;
- a prefetch is queued after the events of the checkpoint jobs it was told to wait for
  (CopyJob.after: those writing host blocks it reads), so it never reads a block still being written;
- the offloader counts host rows as readable only once poll() reports their job done.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from conserve.kv.copy_job import CopyJob
from conserve.kv.copy_queue import CopyQueue, QueueEvent, queue_for
from conserve.model.attention import KVCache


class BlockHostCache:
    """The host tier: [num_blocks, 2 * layers * kv_heads, block_size * head_dim], one block contiguous
    (pinned when the device is a GPU, so copies to and from it are asynchronous)."""

    def __init__(self, like: KVCache, num_blocks: int, queue: CopyQueue) -> None:
        _, planes, width = like.block_view().shape
        self.block_size = like.block_size
        self.num_blocks = num_blocks
        self.blocks = queue.empty((num_blocks, planes, width), like.store.dtype, pinned_host=True)


@dataclass
class _InFlight:
    job: CopyJob
    event: QueueEvent
    keep: tuple[torch.Tensor, ...]  # every tensor the job's queued ops touch


def _runs(blocks: list[int]) -> list[tuple[int, int, int]]:
    """(position in the list, first block, count) for each run of consecutive block numbers."""
    runs: list[tuple[int, int, int]] = []
    for i, b in enumerate(blocks):
        if runs and runs[-1][1] + runs[-1][2] == b:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((i, b, 1))
    return runs


class BlockCopier:
    def __init__(self, device: KVCache, host: BlockHostCache, queue: CopyQueue | None = None) -> None:
        self.device = device
        self.host = host
        self.queue = queue or queue_for(device.store.device)
        self._view = device.block_view()  # kept: ops reference it, the queue does not
        self._pending: list[_InFlight] = []

    def submit(self, job: CopyJob) -> None:
        q, bs = self.queue, self.device.block_size
        dev_blocks: list[int] = []
        host_blocks: list[int] = []
        for seg in job.segments:
            span = seg.block_span(bs)
            dev_blocks += seg.device_blocks[span.start:span.stop]
            host_blocks += seg.host_blocks[span.start:span.stop]
        n = len(dev_blocks)
        # Block numbers reach the device from pinned memory, without a host sync.
        index_host = q.empty((n,), torch.int64, pinned_host=True)
        index_host.copy_(torch.tensor(dev_blocks, dtype=torch.int64))
        index = q.empty((n,), torch.int64)
        staged = q.empty((n, *self._view.shape[1:]), self._view.dtype)
        # After the model work issued so far: it wrote the blocks a checkpoint reads, and may still use
        # blocks just freed to the request a prefetch fills. And after the checkpoints named in `after`.
        q.after_compute()
        for dep in job.after:
            entry = self._entry(dep)
            if entry is not None:
                q.wait(entry.event)
        q.run(lambda i, src: i.copy_(src, non_blocking=True), index, index_host)
        if job.kind == "checkpoint":
            q.run(lambda out, view, i: torch.index_select(view, 0, i, out=out), staged, self._view, index)
            for at, first, count in _runs(host_blocks):
                q.run(lambda dst, src, a=at, f=first, c=count: dst[f:f + c].copy_(src[a:a + c], non_blocking=True),
                      self.host.blocks, staged)
        else:
            for at, first, count in _runs(host_blocks):
                q.run(lambda dst, src, a=at, f=first, c=count: dst[a:a + c].copy_(src[f:f + c], non_blocking=True),
                      staged, self.host.blocks)
            q.run(lambda view, i, src: view.index_copy_(0, i, src), self._view, index, staged)
        self._pending.append(_InFlight(job, q.record(), (index_host, index, staged, self._view, self.host.blocks)))

    def poll(self) -> None:
        """Mark done the jobs whose events have completed (in any order)."""
        for entry in [e for e in self._pending if e.event.query()]:
            self._finish(entry)

    def wait(self, job: CopyJob) -> None:
        entry = self._entry(job)
        if entry is not None:
            entry.event.synchronize()
            self._finish(entry)

    def _entry(self, job: CopyJob) -> _InFlight | None:
        return next((e for e in self._pending if e.job is job), None)

    def _finish(self, entry: _InFlight) -> None:
        self._pending.remove(entry)  # drops the references: the memory may be reused now
        entry.job.done.set()
