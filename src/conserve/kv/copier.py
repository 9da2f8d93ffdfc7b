"""Copies KV entries between the device cache and the host tier, token by token (the CPU copier).

A job runs inline, on the engine thread, when it is submitted: a worker thread would run its index ops
with a second OpenMP team beside the model's, and on a machine with as many cores as model threads
both then stall at every barrier (measured: mixed online/offline steps 42 ms with a worker thread,
25 ms inline, for ~1 ms of copying). Tests that slow the copier down (delay_s) get a worker thread
that runs the jobs in order, late. Either way a job's blocks stay referenced (see copy_job.py) until
`done` is set. On a GPU the block copier (block_copier.py) is the asynchronous one; this one still
works there (for comparison), copying synchronously on the engine thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import torch

from conserve.kv.copy_job import CopyJob
from conserve.model.attention import KVCache

log = logging.getLogger(__name__)

_IDLE_EXIT_S = 1.0


class HostKVCache:
    """Host-memory K/V per layer, laid out like the device cache (pinned on CUDA)."""

    def __init__(self, like: KVCache, num_blocks: int) -> None:
        kv_heads, _, head_dim = like.k[0].shape
        pin = like.k[0].is_cuda
        slots = num_blocks * like.block_size
        self.block_size = like.block_size
        self.num_blocks = num_blocks
        # Uninitialised: on CPU the pages are only committed when a checkpoint first writes them.
        self.k = [torch.empty(kv_heads, slots, head_dim, dtype=like.k[0].dtype, pin_memory=pin) for _ in like.k]
        self.v = [torch.empty(kv_heads, slots, head_dim, dtype=like.k[0].dtype, pin_memory=pin) for _ in like.v]
        self._head_offsets = torch.arange(kv_heads).unsqueeze(1) * slots

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        return (self._head_offsets + slots.unsqueeze(0)).flatten()


def _slots(tables: list[list[int]], spans: list[tuple[int, int]], block_size: int) -> list[int]:
    out = []
    for table, (start, end) in zip(tables, spans):
        out.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
    return out


class Copier:
    def __init__(self, device: KVCache, host: HostKVCache, delay_s: float = 0.0) -> None:
        self.device = device
        self.host = host
        # Tests slow the copier down (on a worker thread) to catch blocks reused too early.
        self.delay_s = delay_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: CopyJob) -> None:
        if not self.delay_s:
            self._run_cpu(job)
            return
        self._queue.put(job)
        with self._lock:
            # The worker exits when idle (it must not keep an unused engine's caches alive forever).
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="conserve-kv-copier", daemon=True)
                self._thread.start()

    def wait(self, job: CopyJob) -> None:
        job.done.wait()

    def poll(self) -> None:
        """Jobs finish on their own (inline, or on the worker thread)."""

    # -- rows ----------------------------------------------------------------------------------
    def _rows(self, job: CopyJob) -> tuple[torch.Tensor, torch.Tensor]:
        bs = self.device.block_size
        spans = [(s.start, s.end) for s in job.segments]
        dev = torch.tensor(_slots([s.device_blocks for s in job.segments], spans, bs), device=self.device.k[0].device)
        host = torch.tensor(_slots([s.host_blocks for s in job.segments], spans, bs))
        return self.device.rows(dev), self.host.rows(host)

    @staticmethod
    def _flat(t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, t.shape[-1])

    # -- CPU: a worker thread ------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=_IDLE_EXIT_S)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            if self.delay_s:
                time.sleep(self.delay_s)
            self._run_cpu(job)

    def _run_cpu(self, job: CopyJob) -> None:
        try:
            self._copy_cpu(job)
        except BaseException as e:  # reported to the engine thread by Offloader.poll
            log.exception("KV copy failed")
            job.error = e
        job.done.set()

    def _copy_cpu(self, job: CopyJob) -> None:
        dev_rows, host_rows = self._rows(job)
        pairs = zip(self.device.k + self.device.v, self.host.k + self.host.v)
        for dev, host in pairs:
            if job.kind == "checkpoint":  # one gather into a contiguous buffer, one scatter
                self._flat(host).index_copy_(0, host_rows, self._flat(dev).index_select(0, dev_rows).to(host.device))
            else:
                self._flat(dev).index_copy_(0, dev_rows, self._flat(host).index_select(0, host_rows).to(dev.device))
