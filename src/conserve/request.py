"""Request state as the scheduler sees it. Pure Python: no torch here."""

from __future__ import annotations

import enum
import time

from conserve.sampling_params import SamplingParams


class RequestClass(enum.Enum):
    ONLINE = "online"  # latency-critical: chat, completions
    OFFLINE = "offline"  # latency-tolerant: batch jobs, service_tier="flex"


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


class Request:
    """One sequence being generated.

    `token_ids` holds prompt then output tokens; `num_computed_tokens` counts those whose KV is in
    the cache. Prefill, chunked prefill, decode and recompute after preemption are all the same
    thing: num_computed_tokens catching up with num_tokens.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        request_class: RequestClass = RequestClass.ONLINE,
        arrival_time: float | None = None,
        max_model_len: int | None = None,
        deadline: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = frozenset(eos_token_ids)
        self.request_class = request_class
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.arrival_seq = 0  # order of arrival at the scheduler (set by it): ties never depend on clocks
        # When an offline request should be done (any clock; only compared with other deadlines): its
        # batch's created_at + completion_window. Earliest deadline first among offline work; None last.
        self.deadline = deadline
        # Host-tier checkpoint (kv/offload.py): tokens whose copy to host was issued, and of those the
        # ones known to be there. A prefetch in flight makes the request wait before it computes.
        self.num_checkpoint_issued = 0
        self.num_checkpointed = 0
        self.checkpoint_epoch = 0  # bumped when the checkpoint is dropped: late copy completions ignored
        self.prefetch_job: object | None = None
        # The seed of this request's sampling noise (sampler.py): its own, or one the runner drew for it.
        self.sampling_seed: int | None = None
        # Longest the sequence may grow: max_tokens, capped by the model's context.
        limit = self.num_prompt_tokens + (sampling_params.max_tokens or 1 << 62)
        self.max_len = min(limit, max_model_len) if max_model_len else limit

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def deadline_key(self) -> float:
        """Sort key: the deadline, or infinity for requests without one (they go after all others)."""
        return self.deadline if self.deadline is not None else float("inf")

    @property
    def is_online(self) -> bool:
        return self.request_class is RequestClass.ONLINE

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def check_stop(self) -> bool:
        """After a token was appended: set a finished status if a token-level stop condition holds."""
        params = self.sampling_params
        if self.num_output_tokens < params.min_tokens:
            return False
        last = self.token_ids[-1]
        if not params.ignore_eos and last in self.eos_token_ids:
            self.status = RequestStatus.FINISHED_STOPPED
            return True
        if last in params.stop_token_ids:
            self.status = RequestStatus.FINISHED_STOPPED
            self.stop_reason = last
            return True
        if self.num_tokens >= self.max_len:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.value}, computed={self.num_computed_tokens}/"
                f"{self.num_tokens})")
