"""SchedulerConfig: the scheduling policy, its budgets and the latency objectives. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass

# fcfs: one queue, no classes (a plain serving system). priority: online before offline in every
# queue; preemption only when KV memory runs out (vLLM's priority policy). sarathi: priority plus a
# fixed per-iteration token budget. conserve: latency-aware token budget from the latency model.
POLICIES = ("fcfs", "priority", "sarathi", "conserve")


@dataclass
class SchedulerConfig:
    policy: str = "conserve"
    max_num_batched_tokens: int = 1024  # hard cap on tokens per iteration, every policy
    max_num_seqs: int = 256
    max_model_len: int = 8192
    token_budget: int = 256  # sarathi's fixed budget
    # Objectives for online requests. Defaults for SmolLM2-135M on a 2-core CPU: see README.
    slo_ttft_s: float = 1.0
    slo_tbt_s: float = 0.1
    tbt_margin: float = 0.1  # fraction of the TBT objective kept back for the model's error
    # Offline fill beside online work is planned so that this quantile of such iterations stays under
    # the TBT objective, from the live spread of measured/predicted times (sched/error_tail.py); the
    # fixed tbt_margin until enough were seen. None: always the fixed margin.
    tbt_quantile: float | None = 0.99
    max_iteration_s: float = 0.5  # longest iteration without online work (bounds an arrival's wait)
    # Offline-only iterations (conserve): the latency model picks their size for throughput, within
    # this many tokens and offline_iteration_s (None: max_iteration_s). With layer-wise preemption
    # that keeps its work, the engine sets offline_iteration_s so that the time between two
    # safepoints, which is what an online arrival may wait, stays within the TBT objective; half of
    # it while online requests came lately (Scheduler.online_recently).
    max_offline_batched_tokens: int = 8192
    offline_iteration_s: float | None = None
    starvation_iterations: int = 8  # offline runs at least once in this many iterations
    # Online latency as a ratio to online-only serving: an iteration with online work may be planned
    # at most this many times as long as its online part alone (predicted), besides staying under
    # the TBT objective; offline-only iterations while online requests came lately are sized so
    # that one safepoint interval fits that room. None: only the TBT objective bounds the fill.
    max_online_slowdown: float | None = None
    num_layer_groups: int = 1  # safepoint intervals in one iteration (layers / safepoint_every)
    min_chunk: int = 16  # smallest prefill chunk forced through when nothing else fits

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"scheduler must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for name in ("max_num_batched_tokens", "max_num_seqs", "token_budget", "starvation_iterations",
                     "min_chunk", "max_offline_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("slo_ttft_s", "slo_tbt_s", "max_iteration_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.offline_iteration_s is not None and not self.offline_iteration_s > 0:
            raise ValueError(f"offline_iteration_s must be > 0, got {self.offline_iteration_s}")
        if self.max_online_slowdown is not None and not self.max_online_slowdown >= 1:
            raise ValueError(f"max_online_slowdown must be >= 1 (or None: off), got {self.max_online_slowdown}")
        if self.num_layer_groups < 1:
            raise ValueError(f"num_layer_groups must be >= 1, got {self.num_layer_groups}")
        if self.tbt_quantile is not None and not 0 < self.tbt_quantile < 1:
            raise ValueError(f"tbt_quantile must be in (0, 1) (or None: off), got {self.tbt_quantile}")
        if not 0 <= self.tbt_margin < 1:
            raise ValueError(f"tbt_margin must be in [0, 1), got {self.tbt_margin}")

    @property
    def has_classes(self) -> bool:
        return self.policy != "fcfs"

    @property
    def tbt_limit_s(self) -> float:
        """Predicted iteration time that online requests' iterations must stay under."""
        return self.slo_tbt_s * (1 - self.tbt_margin)

    @property
    def fixed_budget(self) -> int:
        budget = self.token_budget if self.policy == "sarathi" else self.max_num_batched_tokens
        return min(budget, self.max_num_batched_tokens)
