"""CoserveOptions: what one `conserve bench coserve` run was asked to do (shared by the runner and
the results writer)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from conserve.bench.calibrate import DEFAULT_BURST
from conserve.bench.sweep import DEFAULT_SLOWDOWNS, DEFAULT_TOKEN_BUDGETS
from conserve.bench.systems import DEFAULT_HF_DIR, DEFAULT_VLLM_VENV, CoserveWorkload


@dataclass
class CoserveOptions:
    workload: CoserveWorkload = field(default_factory=CoserveWorkload)
    output_dir: str = "results"
    vllm_venv: str = DEFAULT_VLLM_VENV
    hf_dir: str = DEFAULT_HF_DIR
    conserve_args: list[str] = field(default_factory=list)
    server_timeout_s: float | None = None  # None: 300 s conserve, 600 s vLLM
    load_fraction: float | None = None  # run at this fraction of the measured online capacity; None: fixed rate
    calibration_requests: int = DEFAULT_BURST
    sweep_slo_tbt_ms: list[float] = field(default_factory=list)  # empty: no trade-off sweep
    sweep_token_budgets: list[int] = field(default_factory=lambda: list(DEFAULT_TOKEN_BUDGETS))
    sweep_online_slowdown: list[float] = field(default_factory=lambda: list(DEFAULT_SLOWDOWNS))
    argv: list[str] = field(default_factory=lambda: list(sys.argv))

    @property
    def sweeping(self) -> bool:
        return bool(self.sweep_slo_tbt_ms)

    def tokenizer_json(self) -> str | None:
        """The HF dir holds the served model's tokenizer: with it prompt lengths are exact."""
        path = os.path.join(os.path.expanduser(self.hf_dir), "tokenizer.json")
        return path if os.path.isfile(path) else None
