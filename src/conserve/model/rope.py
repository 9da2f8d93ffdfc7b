"""Rotary position embeddings (rotate-half layout, as in HF checkpoints), with llama3/linear scaling."""

from __future__ import annotations

import math

import torch

from conserve.model.config import ModelConfig


def inv_frequencies(config: ModelConfig, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        inv = _llama3_scale(inv, scaling)
    if freq_factors is not None:
        # GGUF llama3 files carry the scaling as per-dimension divisors instead of config fields.
        inv = inv / freq_factors.to(torch.float64)
    return inv


def _llama3_scale(inv: torch.Tensor, s: dict) -> torch.Tensor:
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    original = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended smoothly.
    smooth = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv / factor + smooth * inv


class RotaryEmbedding:
    def __init__(self, config: ModelConfig, max_positions: int, device: torch.device,
                 freq_factors: torch.Tensor | None = None) -> None:
        inv = inv_frequencies(config, freq_factors)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv).float()
        self.cos = angles.cos().to(device)  # [max_positions, head_dim / 2], float32
        self.sin = angles.sin().to(device)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for these positions, shaped [T, 1, head_dim / 2] to broadcast over heads."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]. Rotate-half: pairs dimension i with i + head_dim / 2."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
