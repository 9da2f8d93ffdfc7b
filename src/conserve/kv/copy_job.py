"""A copy between the device and host KV tiers, described without torch.

A job holds a reference on every block it reads or writes, in both pools, until it completes: a
block freed by its request meanwhile (preempted, finished, aborted) is not handed to anyone else
before the copy is known complete.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from conserve.request import Request


@dataclass
class Segment:
    request: Request
    start: int  # token positions [start, end) of the request
    end: int
    device_blocks: list[int]  # the request's block tables when the job was issued
    host_blocks: list[int]
    epoch: int  # the request's checkpoint_epoch when issued

    def block_span(self, block_size: int) -> range:
        return range(self.start // block_size, -(-self.end // block_size))


@dataclass
class CopyJob:
    kind: str  # "checkpoint" (device -> host) or "prefetch" (host -> device)
    segments: list[Segment]
    device_refs: list[int] = field(default_factory=list)
    host_refs: list[int] = field(default_factory=list)
    num_bytes: int = 0
    # Jobs still in flight on the same host blocks (not two reads): this one is queued after them.
    after: list[CopyJob] = field(default_factory=list, repr=False)
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    error: BaseException | None = None

    @property
    def num_tokens(self) -> int:
        return sum(s.end - s.start for s in self.segments)
