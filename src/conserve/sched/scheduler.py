"""Continuous batching with chunked prefill (first come, first served). Pure Python: no torch.

Each iteration first serves running requests (decodes and unfinished prefill chunks) in arrival
order, then admits waiting ones, all within a token budget. When KV blocks run out, the most
recently admitted running request is preempted and will recompute when it runs again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from conserve.kv.kv_manager import KVCacheManager
from conserve.request import Request, RequestStatus
from conserve.sched.output import ScheduledRequest, SchedulerOutput


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int = 8192

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}

    # -- requests in and out -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        if request.is_online:
            # Online requests wait ahead of offline ones (the co-serving scheduler refines this).
            for i, queued in enumerate(self.waiting):
                if not queued.is_online:
                    self.waiting.insert(i, request)
                    return
        self.waiting.append(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Finish a request from outside (abort, stop string). Unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self.kv.free(request)
        return request

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- one iteration -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate(request, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, num_new, self.kv.block_table(request)))
                budget -= num_new
                i += 1

        # Admit waiting requests only if nobody was preempted: memory is tight otherwise.
        while self.waiting and budget > 0 and not out.preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.kv.allocate(request, num_new):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new, self.kv.block_table(request)))
            budget -= num_new
        return out

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Commit an executed iteration: advance computed tokens, append sampled tokens, finish.

        Returns the requests that finished on a token-level condition (EOS, stop id, length).
        """
        finished = []
        for s in out.scheduled:
            request = s.request
            request.num_computed_tokens += s.num_new_tokens
            token = sampled.get(request.request_id)
            if token is None:
                continue
            request.append_token(token)
            if request.check_stop():
                self.running.remove(request)
                self.requests.pop(request.request_id, None)
                self.kv.free(request)
                finished.append(request)
        return finished
