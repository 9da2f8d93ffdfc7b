"""What the scheduler hands the runner for one iteration. Pure Python: no torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from conserve.request import Request
from conserve.sched.latency_model import IterationShape


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens whose KV this iteration computes, from num_computed_tokens on
    block_table: list[int]
    start: int = field(init=False)  # the request's num_computed_tokens when scheduled
    samples: bool = field(init=False)  # the chunk reaches the sequence's end: sample its next token

    def __post_init__(self) -> None:
        self.start = self.request.num_computed_tokens
        self.samples = self.start + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Resumed requests whose checkpoint (this many tokens) the engine must prefetch before they compute.
    prefetch: list[tuple[Request, int]] = field(default_factory=list)
    # Offline work was planned beside online work under the fill limit (conserve): the engine reports
    # how long the iteration really took, for the error tail that limit is planned against.
    filled: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def shape(self) -> IterationShape:
        shape = IterationShape()
        for s in self.scheduled:
            shape.add(s.num_new_tokens, s.start + s.num_new_tokens)
        return shape

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and not self.prefetch
