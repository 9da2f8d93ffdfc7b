"""EngineConfig: every knob of the engine in one validated place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conserve.kv.offload import OFFLINE_KV_MODES
from conserve.preemption import PREEMPTION_MODES
from conserve.sched.config import SchedulerConfig

# Weight-only quantised matmuls (model/quant.py says what each mode quantises).
QUANTIZATION_MODES = ("auto", "none", "int8", "int4")


@dataclass
class EngineConfig:
    model: str | None = None  # HF directory or GGUF file; None: the default SmolLM2 package
    dtype: str = "auto"
    device: str = "cpu"
    max_model_len: int | None = None  # None: the model's own context length
    kv_cache_gb: float = 1.0
    num_kv_blocks: int | None = None  # overrides kv_cache_gb when set
    block_size: int = 16
    max_num_batched_tokens: int = 1024  # token budget of one iteration
    max_num_seqs: int = 256
    seed: int = 0
    quantization: str = "auto"  # auto | none | int8 | int4 (see model/quant.py)
    quant_max_tokens: int | None = None  # largest iteration using quantised weights; None: measured
    kernel_cache_dir: str = str(Path.home() / ".cache/conserve/kernels")  # measured cross-overs, per CPU
    int4: str | None = None  # deprecated alias: "off" = quantization "none", "auto" = no change
    # Scheduling (see sched/config.py for what each policy does).
    scheduler: str = "conserve"
    slo_ttft_ms: float = 1000.0
    slo_tbt_ms: float = 100.0
    token_budget: int = 256  # sarathi's fixed per-iteration budget
    max_iteration_ms: float = 500.0  # longest iteration without online work, unless preemption is "layer"
    max_offline_batched_tokens: int = 8192  # token cap of offline-only iterations (conserve)
    latency_model: str | None = None  # a `conserve profile` JSON; None: the cache, else profile now
    latency_cache_dir: str = str(Path.home() / ".cache/conserve/latency")
    # Preemption and the host KV tier.
    # "layer": offline-only iterations stop at safepoints and later resume from there; "layer-restart":
    # they stop and are computed again; "iteration": they always run to the end.
    preemption: str = "layer"
    safepoint_every: int = 1  # layers between safepoint checks
    offline_kv: str = "checkpoint"  # checkpoint | swap | recompute
    host_kv_cache_gb: float = 2.0

    def __post_init__(self) -> None:
        if self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.int4 not in (None, "auto", "off"):
            raise ValueError(f"int4 must be auto or off, got {self.int4!r}")
        if self.int4 == "off":
            if self.quantization not in ("auto", "none"):
                raise ValueError(f"int4 'off' contradicts quantization {self.quantization!r}; use quantization only")
            self.quantization = "none"
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, "
                             f"got {self.quantization!r}")
        if self.quant_max_tokens is not None and self.quant_max_tokens < 0:
            raise ValueError(f"quant_max_tokens must be >= 0, got {self.quant_max_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.preemption not in PREEMPTION_MODES:
            raise ValueError(f"preemption must be one of {', '.join(PREEMPTION_MODES)}, got {self.preemption!r}")
        if self.offline_kv not in OFFLINE_KV_MODES:
            raise ValueError(f"offline_kv must be one of {', '.join(OFFLINE_KV_MODES)}, got {self.offline_kv!r}")
        if self.safepoint_every < 1:
            raise ValueError(f"safepoint_every must be >= 1, got {self.safepoint_every}")
        if self.host_kv_cache_gb <= 0:
            raise ValueError(f"host_kv_cache_gb must be > 0, got {self.host_kv_cache_gb}")
        self.scheduler_config(8192)  # validates the scheduling fields

    def scheduler_config(self, max_model_len: int, num_layers: int = 1) -> SchedulerConfig:
        offline_iteration_s = None
        if self.preemption == "layer" and self.scheduler == "conserve":
            # An arrival waits for at most one safepoint interval: keep that within the TBT objective.
            offline_iteration_s = self.slo_tbt_ms / 1000 * -(-num_layers // self.safepoint_every)
        return SchedulerConfig(policy=self.scheduler, max_num_batched_tokens=self.max_num_batched_tokens,
                               max_num_seqs=self.max_num_seqs, max_model_len=max_model_len,
                               token_budget=self.token_budget, slo_ttft_s=self.slo_ttft_ms / 1000,
                               slo_tbt_s=self.slo_tbt_ms / 1000, max_iteration_s=self.max_iteration_ms / 1000,
                               max_offline_batched_tokens=self.max_offline_batched_tokens,
                               offline_iteration_s=offline_iteration_s)
