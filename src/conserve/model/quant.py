"""Which weights get weight-only quantised matmuls (int8.py, int4.py), from the mode and the file.

Modes: "none" keeps dense matmuls only. "int8" / "int4" quantise every layer projection that the
kernel's shape rules allow (int4 from a GGUF file's own Q4 blocks where it has them, else from the
dense values); the lm_head is then int8 (4-bit output rows cost too much accuracy). "auto" follows a
GGUF file: Q4_0/Q4_1 projections run int4, other quantised ones (Q8_0) int8, the lm_head int8 when
the file stores it quantised; an HF checkpoint stays dense (auto never changes an unquantised
model's numbers). Whether and up to which iteration size the quantised matmuls run is measured at
start-up (quant_tuning.py): dense weights are kept for the larger iterations.
"""

from __future__ import annotations

import torch

from conserve.config import QUANTIZATION_MODES
from conserve.model.int4 import Q4_TYPES, Int4Weight, Q4Blocks, int4_kernels_available, quantize_q4
from conserve.model.int8 import Int8Weight
QUANTIZED_FILE_TYPES = (*Q4_TYPES, "Q8_0")

QuantWeight = Int8Weight | Int4Weight


def int8_kernels_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def check_mode(mode: str) -> str:
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, got {mode!r}")
    return mode


def projection_kind(mode: str, file_types: list[str | None]) -> str | None:
    """int8, int4 or None (dense) for a fused projection whose parts the file stored as file_types
    (None: an HF tensor)."""
    if mode in ("int8", "int4"):
        return mode
    if mode == "auto" and file_types and all(t in Q4_TYPES for t in file_types):
        return "int4"
    if mode == "auto" and file_types and all(t in QUANTIZED_FILE_TYPES for t in file_types):
        return "int8"
    return None


def lm_head_kind(mode: str, file_type: str | None) -> str | None:
    if mode in ("int8", "int4") or (mode == "auto" and file_type in QUANTIZED_FILE_TYPES):
        return "int8"
    return None


def build(kind: str | None, dense: torch.Tensor, blocks: list[Q4Blocks | None]) -> QuantWeight | None:
    """The quantised weight of one (fused) projection, or None where the kernel cannot take it."""
    rows, cols = dense.shape
    if kind == "int8" and int8_kernels_available() and Int8Weight.supports(rows, cols):
        return Int8Weight(dense)
    if kind == "int4" and int4_kernels_available() and Int4Weight.supports(rows, cols):
        if blocks and all(b is not None for b in blocks):
            return Int4Weight(blocks)  # the file's own 4-bit values: no second rounding
        return Int4Weight([quantize_q4(dense)])
    return None
