"""What `conserve bench coserve` compares: the systems (a server command line + whether the offline
load runs + how offline requests are marked) and the one workload they all get."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conserve.bench.config import BenchConfig
from conserve.bench.servers import ServerSpec

DEFAULT_VLLM_VENV = ".venv-vllm"
DEFAULT_HF_DIR = "~/.cache/conserve/hf/SmolLM2-135M-Instruct"
CONSERVE_READY_S = 300.0  # a first start may profile the machine for about a minute
VLLM_READY_S = 600.0  # vLLM's CPU build takes 90-120 s to start here
VLLM_PRIORITY_OFFLINE = 10  # vLLM's priority policy runs lower values first; online requests default to 0


@dataclass
class CoserveWorkload:
    """Defaults sized for a 2-core CPU and the 135M default model."""

    request_rate: float = 0.6  # online req/s
    burstiness: float = 0.5  # Gamma shape < 1: burstier than Poisson
    input_len: int = 128
    input_len_range_ratio: float = 0.5
    output_len: int = 64
    duration_s: float = 120.0
    offline_concurrency: int = 16  # summarisation-like flex requests kept in flight
    offline_input_len: int = 1024
    offline_output_len: int = 128
    seed: int = 0
    request_timeout_s: float = 900.0  # a request slower than this counts as failed instead of hanging the run

    @property
    def num_prompts(self) -> int:
        return max(1, round(self.request_rate * self.duration_s))

    def bench_config(self, system: System, base_url: str, tokenizer_json: str | None) -> BenchConfig:
        """The same seed for every system: the same arrivals, lengths and prompt texts."""
        return BenchConfig(base_url=base_url, request_timeout_s=self.request_timeout_s,
                           num_prompts=self.num_prompts, request_rate=self.request_rate,
                           burstiness=self.burstiness, seed=self.seed, input_len=self.input_len,
                           output_len=self.output_len, input_len_range_ratio=self.input_len_range_ratio,
                           tokenizer_json=tokenizer_json,
                           offline_concurrency=self.offline_concurrency if system.offline else 0,
                           offline_input_len=self.offline_input_len, offline_output_len=self.offline_output_len,
                           offline_service_tier=system.offline_service_tier,
                           offline_extra_body=dict(system.offline_extra_body))


class NotRunnable(Exception):
    """The system cannot run on this machine (e.g. no vLLM virtualenv): the reason and how to fix it."""


@dataclass
class LaunchContext:
    port: int
    data_dir: str  # fresh and empty, for this system only
    log_path: str
    conserve_args: list[str] = field(default_factory=list)
    vllm_venv: str = DEFAULT_VLLM_VENV
    hf_dir: str = DEFAULT_HF_DIR
    server_timeout_s: float | None = None  # None: the launcher's default


Launcher = Callable[["System", LaunchContext], ServerSpec]


def conserve_launch(system: System, ctx: LaunchContext) -> ServerSpec:
    argv = [sys.executable, "-m", "conserve.cli", "serve", "--host", "127.0.0.1", "--port", str(ctx.port),
            "--data-dir", ctx.data_dir, *system.server_args, *ctx.conserve_args]
    return ServerSpec(argv, ctx.port, ctx.log_path, ctx.server_timeout_s or CONSERVE_READY_S)


def vllm_launch(system: System, ctx: LaunchContext) -> ServerSpec:
    venv, hf_dir = Path(ctx.vllm_venv).expanduser(), Path(ctx.hf_dir).expanduser()
    exe = venv / "bin" / "vllm"
    if not os.access(exe, os.X_OK):
        raise NotRunnable(f"no vLLM at {exe}: create it with scripts/setup_vllm_venv.sh {ctx.vllm_venv}")
    if not (hf_dir / "config.json").is_file():
        raise NotRunnable(f"no HF model directory at {hf_dir}: write it with "
                          f"python scripts/export_hf_dir.py --out {ctx.hf_dir}")
    argv = [str(exe), "serve", str(hf_dir), "--host", "127.0.0.1", "--port", str(ctx.port),
            "--dtype", "bfloat16", "--served-model-name", hf_dir.name, *system.server_args]
    # Fixed, not inherited: without these vLLM's CPU build reserves a core, sizes its KV cache
    # differently or tries the network, and the numbers would not be comparable.
    env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_TARGET_DEVICE": "cpu", "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    return ServerSpec(argv, ctx.port, ctx.log_path, ctx.server_timeout_s or VLLM_READY_S, env)


@dataclass(frozen=True)
class System:
    name: str
    description: str
    launch: Launcher
    server_args: tuple[str, ...] = ()
    offline: bool = True  # run the offline load beside the online workload
    offline_service_tier: bool = True
    offline_extra_body: dict = field(default_factory=dict)
    # a sweep variant (sweep.py) records what it varies: conserve-tbt50 has family "conserve" and
    # knob "--slo-tbt-ms 50"; a system run once keeps both empty
    family: str = ""
    knob: str = ""

    @property
    def family_name(self) -> str:
        return self.family or self.name


def _conserve(name: str, description: str, *args: str, offline: bool = True) -> System:
    return System(name, description, conserve_launch, tuple(args), offline)


SYSTEMS: dict[str, System] = {s.name: s for s in (
    _conserve("online-only", "conserve defaults, no offline load: the latency reference", offline=False),
    _conserve("non-preemptive", "offline beside online, never throttled: the offline-throughput bound",
              "--scheduler", "priority", "--preemption", "iteration", "--offline-kv", "recompute",
              "--max-num-batched-tokens", "4096"),
    _conserve("conserve", "conserve defaults (everything on) + offline load"),
    _conserve("conserve-slowdown", "conserve with offline fill bounded relative to online-only iterations",
              "--max-online-slowdown", "1.2"),
    _conserve("fixed-margin", "ablation: offline fill planned to the TBT objective less 10%, not to the "
              "measured error tail", "--tbt-quantile", "off"),
    _conserve("fcfs", "ablation: one FCFS queue", "--scheduler", "fcfs"),
    _conserve("priority", "ablation: online first, preempt only on KV pressure", "--scheduler", "priority"),
    _conserve("sarathi", "ablation: fixed per-iteration token budget", "--scheduler", "sarathi"),
    _conserve("iteration-preemption", "ablation: preempt between iterations only", "--preemption", "iteration"),
    _conserve("recompute", "ablation: offline KV recomputed after preemption", "--offline-kv", "recompute"),
    _conserve("layer-restart", "ablation: stopped offline iterations computed again, not resumed",
              "--preemption", "layer-restart"),
    System("vllm-online-only", "vLLM CPU, default policy, no offline load", vllm_launch, offline=False),
    System("vllm-non-preemptive", "vLLM CPU, default policy (FCFS) + offline load: vLLM's offline bound",
           vllm_launch, offline_service_tier=False),
    System("vllm-priority", f"vLLM CPU, priority policy, offline requests priority {VLLM_PRIORITY_OFFLINE}",
           vllm_launch, ("--scheduling-policy", "priority"), offline_service_tier=False,
           offline_extra_body={"priority": VLLM_PRIORITY_OFFLINE}),
)}


def select_systems(names: str | None) -> list[System]:
    """'a,b' -> those systems in the given order; None or empty -> all."""
    if not names:
        return list(SYSTEMS.values())
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    return [SYSTEMS[n] for n in dict.fromkeys(chosen)]
