"""Read a GGUF file: its metadata as an HF-style config, and its tensors dequantised, HF-named."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conserve.errors import ModelLoadError
from conserve.model.int4 import Q4_TYPES, Q4Blocks, unpack_q4

# GGUF architecture -> (HF architecture, q/k rows stored permuted for llama.cpp's interleaved rope)
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "mistral": ("MistralForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def open_gguf(path: Path):
    import gguf

    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors on a damaged header
        raise ModelLoadError(f"{path}: not a readable GGUF file: {e}") from None


def field_value(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_architecture(reader, path: Path) -> str:
    arch = field_value(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(f"{path}: unsupported architecture {arch!r}; supported: {', '.join(_ARCHITECTURES)}")
    return arch


def gguf_hf_config(reader, path: Path) -> dict[str, Any]:
    """Translate GGUF metadata to the config.json fields ModelConfig reads."""
    arch = gguf_architecture(reader, path)

    def get(key: str, default: Any = None) -> Any:
        return field_value(reader, f"{arch}.{key}", default)

    heads = get("attention.head_count")
    names = {t.name for t in reader.tensors}
    vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    hidden = get("embedding_length")
    config = {
        "architectures": [_ARCHITECTURES[arch][0]],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length") or (hidden // heads if hidden and heads else None),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
    }
    if get("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": get("rope.scaling.factor")}
    if any(v is None for v in config.values()):
        missing = [k for k, v in config.items() if v is None]
        raise ModelLoadError(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    return config


def hf_name(gguf_name: str) -> str | None:
    base, _, kind = gguf_name.rpartition(".")
    if gguf_name == "rope_freqs.weight":
        return "rope_freqs"
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    return None


def _unpermute_order(rows: int, heads: int) -> np.ndarray:
    # llama.cpp interleaves each head's rotary pairs (i, i + d/2) as rows (2i, 2i + 1); this row
    # order undoes that, giving the rotate-half layout of HF checkpoints.
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)


def iter_gguf_tensors(reader, path: Path, config: dict[str, Any], want_q4: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor, Q4Blocks | None, str]]:
    """Yield (HF name, float32 tensor, Q4 blocks or None, storage type e.g. "Q8_0") one at a time,
    dequantising quantised types. With want_q4, Q4_0/Q4_1 tensors also come as their raw 4-bit blocks."""
    from gguf import GGMLQuantizationType, quants

    permuted = _ARCHITECTURES[gguf_architecture(reader, path)][1]
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        try:
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                data = np.asarray(t.data, dtype=np.float32)
            else:
                data = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelLoadError(f"{path}: tensor {t.name} uses unsupported type {t.tensor_type.name}") from None
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
        data = data.reshape(shape)
        q4 = None
        if want_q4 and t.tensor_type.name in Q4_TYPES and len(shape) == 2:
            q4 = unpack_q4(t.data, t.tensor_type.name, *shape)
        proj = name.split(".")[-2]
        if permuted and proj in heads:
            order = _unpermute_order(shape[0], heads[proj])
            data = data[order]
            q4 = q4.permute_rows(order) if q4 is not None else None
        yield name, torch.from_numpy(np.array(data, dtype=np.float32, order="C")), q4, t.tensor_type.name
