"""Argmax and top-k over float32 logit rows on CPU (logits_ops.cpp): torch's CPU argmax and topk track
indices in scalar code, ~0.45-0.5 ms each for 32 rows of a 49152-token vocabulary, ~4% of a 32-row
decode step; one vectorised pass takes ~0.04 ms. Built at first use (cpp_kernel.py); where it cannot
be, or off CPU, or with `--fused-ops off`, torch's ops run instead."""

from __future__ import annotations

from pathlib import Path

import torch

from conserve.model.cpp_kernel import CppKernel

_KERNEL = CppKernel("logits_ops", {"argmax_rows": lambda x: x.new_empty(x.shape[:1], dtype=torch.long),
                                   "top_indices": lambda x, k: x.new_empty((x.shape[0], k), dtype=torch.long)},
                    "greedy choice and the logit refinement use torch's argmax and topk")


def available() -> bool:
    return _KERNEL.available()


def load(cache_dir: str | Path) -> bool:
    """Load the ops, building them first if this machine has no cached build."""
    return _KERNEL.load(cache_dir)


def _fits(logits: torch.Tensor, fused: bool) -> bool:
    return (fused and _KERNEL.available() and logits.device.type == "cpu" and logits.dtype == torch.float32
            and logits.dim() == 2 and logits.stride(1) == 1 and logits.shape[1] > 0)


def argmax_rows(logits: torch.Tensor, fused: bool) -> torch.Tensor:
    """logits.argmax(dim=-1), through the kernel when `fused` and it fits."""
    if _fits(logits, fused):
        return torch.ops.conserve.argmax_rows(logits)
    return logits.argmax(dim=-1)


def top_indices(logits: torch.Tensor, k: int, fused: bool) -> torch.Tensor:
    """Indices of each row's k largest logits, largest first (as logits.topk(k).indices)."""
    if _fits(logits, fused) and k <= logits.shape[1]:
        return torch.ops.conserve.top_indices(logits, k)
    return logits.topk(k, dim=-1).indices
