"""ModelConfig: the shape of a Llama-family decoder, read from an HF config.json-style dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from conserve.errors import ModelLoadError

# HF architecture name -> whether q/k/v projections carry a bias.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_scaling: dict[str, Any] | None = None

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; "
                f"conserve supports {', '.join(SUPPORTED_ARCHITECTURES)}")
        try:
            hidden = int(hf["hidden_size"])
            heads = int(hf["num_attention_heads"])
            # transformers >= 5 writes theta and scaling together as "rope_parameters".
            rope_params = hf.get("rope_parameters") or {}
            rope_theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
            rope_scaling = hf.get("rope_scaling") or rope_params or None
            if rope_scaling:
                kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
                if kind not in ("llama3", "linear", "default"):
                    raise ModelLoadError(f"{source}: unsupported rope_scaling type {kind!r}")
                if kind == "default":
                    rope_scaling = None
            return cls(
                architecture=arch,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=bool(hf.get("attention_bias", SUPPORTED_ARCHITECTURES[arch])),
                rope_scaling=rope_scaling,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{source}: missing or invalid field {e}") from None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim
