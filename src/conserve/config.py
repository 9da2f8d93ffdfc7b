"""EngineConfig: every knob of the engine in one validated place."""

from __future__ import annotations

from dataclasses import dataclass


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
    int4: str = "auto"  # "auto": int4 kernels for GGUF Q4 weights at small batches (bf16 CPU); "off"

    def __post_init__(self) -> None:
        if self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.int4 not in ("auto", "off"):
            raise ValueError(f"int4 must be auto or off, got {self.int4!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
