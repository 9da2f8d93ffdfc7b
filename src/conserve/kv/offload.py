"""The host KV tier's policy: checkpoint, swap or recompute. Pure Python (the copies themselves are
done by a torch `Copier`, handed in).

- checkpoint (ConServe): after every iteration, offline requests' newly committed KV is copied to the
  host in the background, each token once. Preempting frees device blocks at once; resuming prefetches
  the checkpoint and recomputes only the tokens never checkpointed.
- swap: nothing is copied while running; preemption copies everything and waits; resume prefetches
  and waits, then drops the host copy (as older systems do).
- recompute needs no offloader at all.

Copies complete late and in any order (on a GPU the host learns it from events). So host rows count
as resumable only once their copy is known complete, and only as a contiguous prefix: a later
segment landing first does not make the one before it readable. And a job is ordered after the jobs
in flight that touch the same host blocks (CopyJob.after; two reads need no order), so a block is
never read or written while another copy still writes it.

With whole_blocks (the block copier) a copy moves whole blocks: after an iteration only the blocks
that became full are checkpointed; at preemption the partial last block is copied too (so a resume
recomputes nothing, and outputs do not depend on recomputed numerics), and copied again, whole, once
it is full.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from conserve.kv.copy_job import CopyJob, Segment
from conserve.kv.host_kv_manager import HostKVManager
from conserve.kv.kv_manager import KVCacheManager
from conserve.request import Request

OFFLINE_KV_MODES = ("checkpoint", "swap", "recompute")


@dataclass
class OffloadStats:
    bytes_checkpointed: int = 0
    bytes_prefetched: int = 0


class Offloader:
    def __init__(self, mode: str, host: HostKVManager, device: KVCacheManager, copier, bytes_per_token: int,
                 whole_blocks: bool = False):
        if mode not in ("checkpoint", "swap"):
            raise ValueError(f"an offloader copies for checkpoint or swap, not {mode!r}")
        self.mode = mode
        self.host = host
        self.device = device
        self.copier = copier  # submit(job), poll(), wait(job): see copier.py, block_copier.py
        self.bytes_per_token = bytes_per_token
        self.whole_blocks = whole_blocks
        self.stats = OffloadStats()
        self._in_flight: list[CopyJob] = []
        # Completed checkpoint segments not yet joined to their request's readable prefix:
        # request id -> [(epoch, start, end)].
        self._landed: dict[str, list[tuple[int, int, int]]] = {}

    # -- copies out ----------------------------------------------------------------------------
    def checkpoint(self, requests: Iterable[Request], evictable: Callable[[], Iterable[Request]]) -> None:
        """After a committed iteration: copy these requests' KV committed since their last checkpoint."""
        if self.mode != "checkpoint":
            return
        segments = []
        for r in requests:
            start, end = r.num_checkpoint_issued, self._checkpointable(r.num_computed_tokens)
            if r.prefetch_job is not None or end <= start:
                continue
            if not self.host.reserve(r, end, evictable):
                continue  # host full of running checkpoints: catch up later
            segments.append(self._segment(r, start, end))
            r.num_checkpoint_issued = end
        if segments:
            self._submit(CopyJob("checkpoint", segments))

    def on_preempt(self, request: Request, evictable: Callable[[], Iterable[Request]]) -> None:
        """Before the request's device blocks are freed. Copies still in flight complete first (they
        hold their blocks); what is not yet copied is copied now (whole_blocks: the partial last
        block), and swap waits for it."""
        request.prefetch_job = None  # an unfinished prefetch is abandoned (its blocks stay held)
        if self.mode == "swap" or self.whole_blocks:
            start, end = request.num_checkpoint_issued, request.num_computed_tokens
            if end > start and self.host.reserve(request, end, evictable):
                job = CopyJob("checkpoint", [self._segment(request, start, end)])
                request.num_checkpoint_issued = end
                self._submit(job)
                if self.mode == "swap":
                    self.copier.wait(job)
                    self.poll()

    # -- copies back ---------------------------------------------------------------------------
    def resumable_tokens(self, request: Request) -> int:
        """Tokens a resume can prefetch instead of recomputing: those whose checkpoint has landed."""
        return request.num_checkpointed if request.request_id in self.host.tables else 0

    def prefetch(self, request: Request, num_tokens: int) -> None:
        """The request's device table already holds num_tokens (at most its landed checkpoint); fill it
        from the host. The request stays unrunnable until poll() sees the copy complete."""
        job = CopyJob("prefetch", [self._segment(request, 0, num_tokens)])
        request.prefetch_job = job
        self._submit(job)
        if self.mode == "swap":
            self.copier.wait(job)

    # -- completion ----------------------------------------------------------------------------
    def poll(self) -> list[Request]:
        """Apply completed copies; return the requests whose prefetch completed (now runnable)."""
        self.copier.poll()
        ready = []
        done = [job for job in self._in_flight if job.done.is_set()]
        for job in done:
            self._in_flight.remove(job)
            if job.error is not None:
                raise RuntimeError(f"KV {job.kind} copy failed: {job.error}") from job.error
            self.device.pool.free(job.device_refs)
            self.host.pool.free(job.host_refs)
            for seg in job.segments:
                r = seg.request
                if job.kind == "checkpoint":
                    self.stats.bytes_checkpointed += (seg.end - seg.start) * self.bytes_per_token
                    self._landed_segment(r, seg)
                elif r.prefetch_job is job:
                    self.stats.bytes_prefetched += (seg.end - seg.start) * self.bytes_per_token
                    r.prefetch_job = None
                    r.num_computed_tokens = seg.end
                    if self.mode == "swap":
                        self.host.drop(r)  # swap keeps no host copy once resumed
                    ready.append(r)
        return ready

    def wait_oldest(self) -> None:
        if self._in_flight:
            self.copier.wait(self._in_flight[0])

    def wait_all(self) -> None:
        for job in list(self._in_flight):
            self.copier.wait(job)
        self.poll()

    def drop(self, request: Request) -> None:
        """The request finished or was aborted: forget its checkpoint."""
        request.prefetch_job = None
        self._landed.pop(request.request_id, None)
        self.host.drop(request)

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    # -- helpers -------------------------------------------------------------------------------
    def _checkpointable(self, num_computed: int) -> int:
        """How far a checkpoint may reach: every computed token, or with whole_blocks the full blocks."""
        if not self.whole_blocks:
            return num_computed
        return num_computed - num_computed % self.device.block_size

    def _landed_segment(self, request: Request, seg: Segment) -> None:
        """A checkpoint segment completed: extend the request's readable prefix as far as it is
        contiguous (segments of one epoch partition [0, num_checkpoint_issued); older epochs are stale)."""
        epoch = request.checkpoint_epoch
        spans = [s for s in self._landed.get(request.request_id, []) if s[0] == epoch]
        if seg.epoch == epoch:
            spans.append((seg.epoch, seg.start, seg.end))
        spans.sort(key=lambda s: s[1])
        while spans and spans[0][1] <= request.num_checkpointed:
            request.num_checkpointed = max(request.num_checkpointed, spans.pop(0)[2])
        if spans:
            self._landed[request.request_id] = spans
        else:
            self._landed.pop(request.request_id, None)

    def _segment(self, request: Request, start: int, end: int) -> Segment:
        return Segment(request, start, end, list(self.device.block_table(request)),
                       list(self.host.block_table(request)), request.checkpoint_epoch)

    def _submit(self, job: CopyJob) -> None:
        bs = self.device.block_size
        for seg in job.segments:
            span = seg.block_span(bs)
            job.device_refs += seg.device_blocks[span.start:span.stop]
            job.host_refs += seg.host_blocks[span.start:span.stop]
        # After the copies in flight on the same host blocks: a partial block is copied again once full
        # (whole_blocks), and a token-granular checkpoint shares its partial block with the next one.
        touched = set(job.host_refs)
        job.after = [j for j in self._in_flight if (job.kind, j.kind) != ("prefetch", "prefetch")
                     and touched.intersection(j.host_refs)]
        self.device.pool.share(job.device_refs)
        self.host.pool.share(job.host_refs)
        job.num_bytes = job.num_tokens * self.bytes_per_token
        self._in_flight.append(job)
        self.copier.submit(job)
