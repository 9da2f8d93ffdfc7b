"""What one `conserve bench serve` run does: the target, the online workload and the offline load."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
DEFAULT_NUM_PROMPTS = 1000  # as `vllm bench serve`; a trace defaults to all its rows


@dataclass
class BenchConfig:
    # target
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first id of GET /v1/models
    api_key: str | None = None  # None: $OPENAI_API_KEY, else "EMPTY"
    endpoint: str = "completions"  # or "chat"
    request_timeout_s: float = 6 * 3600.0  # generous: a saturated server may queue requests for long
    # online workload: synthetic (rate, burstiness, lengths) or replayed from a trace
    num_prompts: int | None = None
    request_rate: float | None = None  # req/s; None or inf: all at once (synthetic mode only)
    burstiness: float = 1.0
    max_concurrency: int | None = None  # cap on online requests in flight (they queue client-side)
    seed: int = 0
    input_len: int = 1024
    output_len: int = 128
    input_len_range_ratio: float = 0.0
    trace: str | None = None
    trace_rate_scale: float = 1.0
    max_input_len: int | None = None
    max_output_len: int | None = None
    tokenizer_json: str | None = None
    # offline load, kept up for the whole online run
    offline_concurrency: int = 0  # flex requests kept in flight
    offline_input_len: int = 1024
    offline_output_len: int = 128
    offline_batch: bool = False  # a Batch API job instead of flex requests
    offline_batch_size: int = 1000
    offline_batch_poll_s: float = 1.0
    # how offline requests are marked: conserve reads service_tier=flex; vLLM's priority scheduler
    # reads an integer "priority" instead (lower first) and may reject an unknown service tier
    offline_service_tier: bool = True  # send "service_tier": "flex"
    offline_extra_body: dict = field(default_factory=dict)  # merged into offline bodies, e.g. {"priority": 10}
    # report
    goodput: dict[str, float] = field(default_factory=dict)  # metric (ttft/tpot/e2el) -> SLO in ms
    percentiles: list[float] = field(default_factory=lambda: [90.0, 99.0])
    quiet: bool = False

    @property
    def endpoint_path(self) -> str:
        return ENDPOINTS[self.endpoint]

    @property
    def rate(self) -> float:
        return math.inf if self.request_rate is None else self.request_rate

    @property
    def offline_mode(self) -> str:
        if self.offline_batch:
            return "batch"
        return "flex" if self.offline_concurrency > 0 else "none"

    def resolved_api_key(self) -> str:
        return self.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"

    def validate(self) -> None:
        """Raise ValueError, with a message for the user, on the first mistake found."""
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        _positive("--num-prompts", self.num_prompts, allow_none=True)
        _positive("--max-concurrency", self.max_concurrency, allow_none=True)
        _positive("--input-len", self.input_len)
        _positive("--output-len", self.output_len)
        _positive("--max-input-len", self.max_input_len, allow_none=True)
        _positive("--max-output-len", self.max_output_len, allow_none=True)
        _positive("--request-timeout", self.request_timeout_s)
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0 or inf, got {self.request_rate}")
        _positive("--burstiness", self.burstiness)
        if not 0.0 <= self.input_len_range_ratio < 1.0:
            raise ValueError(f"--input-len-range-ratio must be in [0, 1), got {self.input_len_range_ratio}")
        if self.trace is not None:
            if not os.path.isfile(self.trace):
                raise ValueError(f"no such trace file: {self.trace}")
            if self.request_rate is not None:
                raise ValueError("--request-rate does not apply to --trace; use --trace-rate-scale")
        _positive("--trace-rate-scale", self.trace_rate_scale)
        if self.tokenizer_json is not None and not os.path.isfile(self.tokenizer_json):
            raise ValueError(f"no such tokenizer file: {self.tokenizer_json}")
        if self.offline_concurrency < 0:
            raise ValueError(f"--offline-concurrency must be >= 0, got {self.offline_concurrency}")
        _positive("--offline-input-len", self.offline_input_len)
        _positive("--offline-output-len", self.offline_output_len)
        _positive("--offline-batch-size", self.offline_batch_size)
        _positive("--offline-batch-poll", self.offline_batch_poll_s)
        for name, slo in self.goodput.items():
            if name not in ("ttft", "tpot", "e2el") or not slo >= 0:
                raise ValueError(f"bad --goodput objective {name}:{slo}")
        for p in self.percentiles:
            if not 0 < p <= 100:
                raise ValueError(f"--percentiles must be in (0, 100], got {p}")


def _positive(flag: str, value: float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not value > 0:
        raise ValueError(f"{flag} must be > 0, got {value}")
