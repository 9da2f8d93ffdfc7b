"""The CPU prefill-attention kernel (prefill_attention.cpp) as `torch.ops.conserve.prefill_attention`:
causal attention of a prefill chunk over its context: flash attention, register-blocked, with bfloat16
products on AVX512-BF16 (vdpbf16ps) and float32 ones elsewhere.

torch's CPU flash attention (scaled_dot_product_attention) was measured at ~12 ms a layer for a
1024-token SmolLM2 prompt in bfloat16 (~100 GFLOP/s), more than the layer's projections; the kernel's
bfloat16 path takes 3.3 ms (370 GFLOP/s; Zen5, 2 threads). Its float32 path runs at torch's speed
(~100 GFLOP/s, the FMA units' limit), so `--prefill-attention auto` uses the kernel only where it is
native (bfloat16 with AVX512-BF16). Built at first use (cpp_kernel.py); without a compiler, or for a head size it was not
built for, prefill attention stays on scaled_dot_product_attention (attention.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from conserve.machine import cpu_flags
from conserve.model.cpp_kernel import CppKernel

HEAD_SIZES = (64, 96, 128)  # the head sizes the kernel is instantiated for

_KERNEL = CppKernel("prefill_attention", {"prefill_attention": lambda q, k, v, scale: torch.empty_like(q)},
                    "prefill attention uses scaled_dot_product_attention")


def available() -> bool:
    """Whether the op is loaded in this process."""
    return _KERNEL.available()


def load(cache_dir: str | Path) -> bool:
    """Load the kernel, building it first if this machine has no cached build."""
    return _KERNEL.load(cache_dir)


def supports(head_dim: int) -> bool:
    return head_dim in HEAD_SIZES


def native(dtype: torch.dtype) -> bool:
    """Whether the kernel runs this dtype on its own dot-product instructions (bfloat16 on AVX512-BF16:
    ~4x torch's flash attention). Its float32 path only matches torch's, so `auto` leaves that to torch."""
    return dtype == torch.bfloat16 and {"avx512f", "avx512_bf16"} <= cpu_flags()
