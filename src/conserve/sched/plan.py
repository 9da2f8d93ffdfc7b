"""One iteration being planned: what is scheduled so far, its shape, and how much more fits.

The sizing questions the co-serving scheduler asks the latency model live here. Pure Python.
"""

from __future__ import annotations

import dataclasses

from conserve.request import Request
from conserve.sched.latency_model import IterationShape, LatencyModel
from conserve.sched.output import ScheduledRequest, SchedulerOutput


class IterationPlan:
    def __init__(self, out: SchedulerOutput, max_tokens: int) -> None:
        self.out = out
        self.max_tokens = max_tokens
        self.shape = IterationShape()
        self.ids: set[str] = set()
        self.has_online = False
        self.has_online_decode = False
        self.num_offline = 0
        self.num_online_prefills = 0
        # What offline work may raise the iteration's predicted time to when it has online work
        # (Scheduler._fill_limit, set once the online part is planned).
        self.fill_limit_s = 0.0

    @property
    def tokens_left(self) -> int:
        return self.max_tokens - self.shape.tokens

    def add(self, request: Request, num_new: int, block_table: list[int]) -> None:
        self.out.scheduled.append(ScheduledRequest(request, num_new, block_table))
        self.shape.add(num_new, request.num_computed_tokens + num_new)
        self.ids.add(request.request_id)
        if request.is_online:
            self.has_online = True
            if num_new == 1 and request.num_computed_tokens + 1 == request.num_tokens:
                self.has_online_decode = True
            else:
                self.num_online_prefills += 1
        else:
            self.num_offline += 1


def largest_fitting(model: LatencyModel, shape: IterationShape, start: int, remaining: int,
                    limit_s: float) -> int:
    """The most of `remaining` tokens (from position `start`) that keep the predicted time <= limit."""
    def fits(n: int) -> bool:
        return model.predict(shape.plus(n, start + n)) <= limit_s

    if remaining <= 0 or not fits(1):
        return 0
    if remaining == 1 or fits(remaining):
        return remaining
    lo, hi = 1, remaining  # fits(lo) and not fits(hi); predictions grow with n (coefficients >= 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def throughput(model: LatencyModel, shape: IterationShape) -> float:
    """Predicted tokens/s, leaving out prefill attention (R): a prompt's attention over its own tokens
    is paid however it is chunked, so counting it would make splitting prompts into many small
    chunks look cheaper now, only to pay more later (chunks after context attend through a mask)."""
    seconds = model.predict(dataclasses.replace(shape, prefill_reads=0))
    return shape.tokens / seconds if seconds > 0 else float("inf")


def best_throughput_chunk(model: LatencyModel, shape: IterationShape, start: int, largest: int) -> int:
    """Among largest, largest/2, ... 1 tokens, the chunk that gives the iteration the best predicted
    tokens/s; 0 if adding any of them would lower the iteration's throughput."""
    best_n, best_tp = 0, throughput(model, shape) if shape.tokens else 0.0
    n = largest
    while n >= 1:
        tp = throughput(model, shape.plus(n, start + n))
        if tp > best_tp:
            best_n, best_tp = n, tp
        n //= 2
    return best_n
