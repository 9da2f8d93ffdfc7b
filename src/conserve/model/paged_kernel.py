"""The CPU paged-attention kernel (paged_attention.cpp) as the op `torch.ops.conserve.paged_attention`.

torch's own choices were measured first: FlexAttention compiled for CPU with a block mask over the
paged cache took 6-16 ms per layer for 32 decodes of 100 tokens (the gather + batched matmuls it
would replace: ~0.3 ms), and a ragged formulation in torch ops (eager or compiled by inductor) was
3-4x slower than the padded gather for equal lengths. So the kernel is a small C++ file built at first
use (cpp_kernel.py); without a compiler the runner falls back to the padded gather (attention.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from conserve.model.cpp_kernel import CppKernel

# Shapes for torch.compile's tracing: the output is shaped like the queries.
_KERNEL = CppKernel("paged_attention", {"paged_attention": lambda q, *args: torch.empty_like(q)},
                    "decode attention gathers padded contexts")


def available() -> bool:
    """Whether the op is loaded in this process."""
    return _KERNEL.available()


def load(cache_dir: str | Path) -> bool:
    """Load the kernel, building it first if this machine has no cached build."""
    return _KERNEL.load(cache_dir)
