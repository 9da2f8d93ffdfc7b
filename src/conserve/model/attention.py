"""Attention over the paged KV cache.

The runner orders an iteration's tokens as: all decode tokens (one per request) first, then each
prefill chunk as a contiguous run. New keys/values are written into the cache at `slot_mapping`
(slot = block * block_size + offset); attention then reads the context back through slot indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class PrefillChunk:
    start: int  # first row of this chunk in the iteration's tokens
    end: int
    context_slots: torch.Tensor | None  # [ctx] slots of the whole context; None: chunk is the context
    mask: torch.Tensor | None  # [q, ctx] bool, True = attend; None: plain causal


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes
    num_decodes: int
    decode_slots: torch.Tensor | None  # [B, L] context slots per decode request, padded
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] bool, False on padding
    prefills: list[PrefillChunk]


class KVCache:
    """Per-layer key and value tensors, each [num_blocks * block_size, kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        slots = num_blocks * block_size
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.k = [torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """q: [T, heads, D]; k, v: [T, kv_heads, D] (this iteration's new entries). Returns [T, heads, D]."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        out[:nd] = _decode_attention(q[:nd], k_cache, v_cache, meta.decode_slots, meta.decode_mask)
    for chunk in meta.prefills:
        qc = q[chunk.start:chunk.end].transpose(0, 1)  # [heads, q, D]
        if chunk.context_slots is None:
            kc, vc = k[chunk.start:chunk.end], v[chunk.start:chunk.end]
        else:
            kc = k_cache.index_select(0, chunk.context_slots)
            vc = v_cache.index_select(0, chunk.context_slots)
        o = _sdpa(qc, kc.transpose(0, 1), vc.transpose(0, 1), chunk.mask, causal=chunk.mask is None)
        out[chunk.start:chunk.end] = o.transpose(0, 1)
    return out


def _decode_attention(q, k_cache, v_cache, slots, mask):
    # Fold the query heads sharing one KV head into the "query length" axis: no K/V repeat needed.
    b, heads, d = q.shape
    kv_heads = k_cache.shape[1]
    qg = q.view(b, kv_heads, heads // kv_heads, d)
    # index_select on a flat index is several times faster than advanced indexing on CPU.
    flat = slots.flatten()
    kc = k_cache.index_select(0, flat).view(*slots.shape, kv_heads, d).transpose(1, 2)  # [B, kv_heads, L, D]
    vc = v_cache.index_select(0, flat).view(*slots.shape, kv_heads, d).transpose(1, 2)
    o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=mask)
    return o.reshape(b, heads, d)


def _sdpa(q, k, v, mask, causal):
    if q.shape[0] != k.shape[0]:
        if _HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        rep = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
