"""Int4 weight-only matmuls: GGUF Q4_0/Q4_1 blocks as they are, or dense weights quantised at load.

A Q4_1 block stores 32 weights as w = d * q + m (q in 0..15); Q4_0 as w = d * (q - 8). torch's
int4 CPU kernel computes w = (q - 8) * scale + zero per group, so both map onto it exactly (up to
rounding d and m to bfloat16): scale = d, zero = m + 8 d (Q4_1) or 0 (Q4_0). Dense weights are
quantised the Q4_1 way (per 32-weight group, from its min and max). At batch sizes of a few tokens a
matmul is bound by weight bytes, and 4-bit weights move a quarter of bfloat16's.

The kernel also takes float32 activations, but its float32 path is 10-100x slower than its bfloat16
one (benchmarks/quant_kernels.py), so float32 activations are rounded to bfloat16 around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GROUP = 32  # weights per GGUF Q4 block
Q4_TYPES = ("Q4_0", "Q4_1")


def int4_kernels_available() -> bool:
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


@dataclass
class Q4Blocks:
    """One GGUF Q4 tensor unpacked: q [N, K] in 0..15, scale and zero [N, K / 32] float32."""

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray

    def permute_rows(self, order: np.ndarray) -> Q4Blocks:
        return Q4Blocks(self.q[order], self.scale[order], self.zero[order])


def unpack_q4(raw: np.ndarray, type_name: str, rows: int, cols: int) -> Q4Blocks:
    """raw: the tensor's bytes as uint8 [rows, blocks * block_bytes]."""
    has_min = type_name == "Q4_1"
    block_bytes = 20 if has_min else 18
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // GROUP, block_bytes)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4 if has_min else 2:]
    # Byte j holds weight j in its low nibble and weight j + 16 in its high nibble.
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)
    if has_min:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero = m + 8 * d
    else:
        zero = np.zeros_like(d)
    return Q4Blocks(q, d, zero)


def quantize_q4(weight: torch.Tensor) -> Q4Blocks:
    """A dense [N, K] weight as asymmetric 4-bit groups of 32 (like Q4_1)."""
    w = weight.detach().float().reshape(weight.shape[0], -1, GROUP)
    low, high = w.amin(-1), w.amax(-1)
    scale = (high - low) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant groups: q = 0 is exact
    q = torch.round((w - low[..., None]) / safe[..., None]).clamp_(0, 15).to(torch.uint8)
    return Q4Blocks(q.reshape(weight.shape).numpy(), scale.numpy(), (low + 8 * scale).numpy())


class Int4Weight:
    """A [N, K] weight packed for torch's int4 CPU kernel."""

    def __init__(self, parts: list[Q4Blocks]) -> None:
        q = torch.from_numpy(np.concatenate([p.q for p in parts]).astype(np.int32))
        scale = torch.from_numpy(np.concatenate([p.scale for p in parts]))
        zero = torch.from_numpy(np.concatenate([p.zero for p in parts]))
        self.out_features, self.in_features = q.shape
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        self.scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()

    @staticmethod
    def supports(rows: int, cols: int) -> bool:
        return rows % 16 == 0 and cols % GROUP == 0  # the kernel's packing constraints

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), self.packed, GROUP,
                                              self.scales_zeros)
        return y.to(x.dtype)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes
