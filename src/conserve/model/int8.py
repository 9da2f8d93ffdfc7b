"""Int8 weight-only matmuls: one symmetric scale per output row (torch's int8 CPU kernel).

GGUF Q8_0 keeps a scale per 32 weights, which this kernel cannot take, so Q8_0 (and any other)
weights are requantised from their dequantised values; the extra rounding is at most half a step of
the row's largest weight / 126. Like int4.py, float32 activations are rounded to bfloat16 around the
kernel, whose float32 path is many times slower than its bfloat16 one.
"""

from __future__ import annotations

import torch


class Int8Weight:
    """A [N, K] weight as int8 with a per-row scale: w[n, k] ~= q[n, k] * scale[n]."""

    def __init__(self, weight: torch.Tensor) -> None:
        w = weight.detach().float()
        self.out_features, self.in_features = w.shape
        # The kernel takes bfloat16 scales: quantise with the rounded scale, so the only error is the
        # half step of rounding to an integer. /126 keeps the largest weight within 127 steps after
        # the scale rounds down (bfloat16 is within 2^-9 of it).
        scale = (w.abs().amax(dim=1) / 126).to(torch.bfloat16)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
        self.q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        self.scale = scale

    @staticmethod
    def supports(rows: int, cols: int) -> bool:
        # The bfloat16 kernel reads K in vectors of 16: other widths were seen to give wrong results.
        return cols % 16 == 0

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.q, self.scale)
        return y.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes
