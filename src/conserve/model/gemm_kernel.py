"""bfloat16 matmuls on AVX512-BF16 (gemm_bf16.cpp) as `torch.ops.conserve.linear_bf16`, with weights
packed once at load by `torch.ops.conserve.pack_bf16_weight`. Built at first use (cpp_kernel.py);
where it cannot be, or the CPU lacks AVX512-BF16, oneDNN's matmuls run instead."""

from __future__ import annotations

from pathlib import Path

import torch

from conserve.model.cpp_kernel import CppKernel

PANEL = 48  # output columns per packed panel (gemm_bf16.cpp's kPanel)
PLAIN, GATED_PLAIN, SILU = 0, 1, 2  # linear_bf16's modes (gemm_bf16.cpp's Mode)

_KERNEL = CppKernel(
    "gemm_bf16",
    {"pack_bf16_weight": lambda w, gated=False: w.new_empty(
        ((2 * -(-w.shape[0] // 2 // PANEL)) if gated else -(-w.shape[0] // PANEL), w.shape[1] // 2, PANEL),
        dtype=torch.int32),
     "linear_bf16": lambda x, packed, n, bias, mode=0: x.new_empty((x.shape[0], n // 2 if mode == SILU else n))},
    "bfloat16 projections run on oneDNN only")


def load(cache_dir: str | Path) -> bool:
    """Load the ops (building them first if needed); True only where the kernel can run on this CPU."""
    return _KERNEL.load(cache_dir) and bool(torch.ops.conserve.gemm_bf16_available())


def available() -> bool:
    return _KERNEL.available() and bool(torch.ops.conserve.gemm_bf16_available())


class PanelWeight:
    """A bfloat16 [N, K] weight packed into the kernel's panels (it replaces the plain or oneDNN-packed
    tensor in the model: one copy of the weights). gated: a fused gate/up projection ([2I, K]), packed
    so that `silu_matmul` writes silu(gate) * up directly; `matmul` still gives [gate | up]."""

    def __init__(self, weight: torch.Tensor, gated: bool = False) -> None:
        self.shape = weight.shape
        self.out_features, self.in_features = weight.shape
        self.gated = gated
        self.packed = torch.ops.conserve.pack_bf16_weight(weight.to(torch.bfloat16), gated)

    @staticmethod
    def supports(weight: torch.Tensor) -> bool:
        return weight.dim() == 2 and weight.shape[1] % 2 == 0 and weight.shape[0] % 2 == 0

    @staticmethod
    def _rows(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or x.stride(-1) != 1 or x.stride(0) % 2:
            x = x.to(torch.bfloat16).contiguous()
        return x

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.conserve.linear_bf16(self._rows(x), self.packed, self.out_features, bias,
                                              GATED_PLAIN if self.gated else PLAIN)

    def silu_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x gate^T) * (x up^T), [M, I]: only for a gated weight."""
        assert self.gated, "silu_matmul needs a gated packing"
        return torch.ops.conserve.linear_bf16(self._rows(x), self.packed, self.out_features, None, SILU)
