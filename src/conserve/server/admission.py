"""Admission control: bound the requests waiting for their first token, per class, and turn away
online requests whose predicted time to first token is hopeless. Pure Python.

A request counts as waiting from admission until its first token (or its end). Each admitted request
carries the predicted time to prefill its prompt; the online ones' sum is the queue an online
newcomer waits behind (online prefill runs before offline work, so offline work is not counted). An
online request is turned away for its predicted TTFT only when some are waiting ahead of it.
The prediction ignores decodes interleaved with the prefills, so it is a lower bound on the real TTFT.
Batch API lines are not admitted here: they are bounded by --max-batch-concurrency instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from conserve.request import RequestClass

QUEUE_FULL, TTFT = "queue_full", "predicted_ttft"


@dataclass
class AdmissionLimits:
    max_waiting_online: int = 256  # 0: no limit
    max_waiting_offline: int = 256  # 0: no limit
    ttft_factor: float = 5.0  # reject online when predicted TTFT > factor x slo_ttft_s; 0: off
    slo_ttft_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_waiting_online < 0 or self.max_waiting_offline < 0:
            raise ValueError("the waiting-request limits must be >= 0 (0: no limit)")
        if self.ttft_factor < 0:
            raise ValueError(f"the predicted-TTFT factor must be >= 0 (0: off), got {self.ttft_factor}")


class Rejected(Exception):
    def __init__(self, reason: str, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.reason, self.message, self.retry_after = reason, message, retry_after

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after)))


class Ticket:
    """One admitted request's place in the waiting count; release() when it leaves the queue."""

    def __init__(self, admission: Admission, request_class: RequestClass, seconds: float) -> None:
        self._admission, self.request_class, self.seconds = admission, request_class, seconds
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._leave(self)

    # A safety net: a streamed response whose body never started still gives its place back once the
    # request is garbage (CPython frees it as the last reference goes).
    __del__ = release


class Admission:
    """predict_prefill(prompt_tokens) -> predicted seconds to prefill such a prompt, or None when there
    is no latency model (then only the count limits apply). Used from the event loop thread only."""

    def __init__(self, limits: AdmissionLimits, predict_prefill: Callable[[int], float | None]) -> None:
        self.limits = limits
        self._predict = predict_prefill
        self.waiting = {c: 0 for c in RequestClass}
        self.queued_s = {c: 0.0 for c in RequestClass}  # predicted prefill time of the waiting requests

    def admit(self, request_class: RequestClass, prompt_lens: list[int]) -> list[Ticket]:
        """Admit all of these prompts (one request each) or raise Rejected for the lot."""
        limits = self.limits
        online = request_class is RequestClass.ONLINE
        limit = limits.max_waiting_online if online else limits.max_waiting_offline
        predicted = [self._predict(n) for n in prompt_lens]
        own_s = sum(p for p in predicted if p is not None)
        wait_s = self.queued_s[request_class]
        if limit and self.waiting[request_class] + len(prompt_lens) > limit:
            tier = "online" if online else "flex"
            raise Rejected(QUEUE_FULL, f"too many {tier} requests waiting ({self.waiting[request_class]}, limit "
                           f"{limit}); retry later", wait_s)
        # Only a queue ahead is grounds to turn a request away: alone, it starts at once whatever the
        # prediction says (and a misfit latency model cannot shut the server to everyone).
        if online and limits.ttft_factor and self.waiting[request_class] and None not in predicted:
            bound = limits.ttft_factor * limits.slo_ttft_s
            if wait_s + own_s > bound:
                raise Rejected(TTFT, f"the server is overloaded: predicted time to first token {wait_s + own_s:.1f} s "
                               f"exceeds {bound:.1f} s; retry later", wait_s + own_s - bound)
        tickets = [Ticket(self, request_class, p or 0.0) for p in predicted]
        for t in tickets:
            self.waiting[request_class] += 1
            self.queued_s[request_class] += t.seconds
        return tickets

    def _leave(self, ticket: Ticket) -> None:
        c = ticket.request_class
        self.waiting[c] -= 1
        self.queued_s[c] = max(0.0, self.queued_s[c] - ticket.seconds) if self.waiting[c] else 0.0
