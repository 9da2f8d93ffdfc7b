"""Attention over the paged KV cache.

The runner orders an iteration's tokens as: all decode tokens (one per request) first, then each
prefill chunk as a contiguous run. New keys/values are written into the cache at `slot_mapping`
(slot = block * block_size + offset); attention then reads the context back through slot indices.

The cache keeps heads outermost, [kv_heads, slots, head_dim]: a gather of the context then yields
[kv_heads, B * L, head_dim], which views as contiguous [kv_heads * B, L, head_dim] matrices that
batched matmuls consume without another copy. Gathers and writes index the flattened
[kv_heads * slots, head_dim] view along dim 0 (index_select along an inner dim is ~4x slower on CPU);
the runner expands slot numbers into such head-major row numbers once per iteration.

Decode attention has three paths. With the CPU kernel (paged_kernel.py), or FlexAttention on CUDA
(flex_paged.py), it reads each request's blocks in place through its block table, so a long context
costs only its own reads. Without them, decodes gather their contexts padded to the longest one and
run two batched matmuls. Prefill chunks gather their own context (no padding: the copy is a small part
of the chunk's work) for the CPU prefill kernel (prefill_kernel.py) or, without it, the flash kernel of
scaled_dot_product_attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from conserve.model.lazy_zeros import lazy_zeros

_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class PrefillChunk:
    start: int  # first row of this chunk in the iteration's tokens
    end: int
    context_slots: torch.Tensor | None  # [kv_heads * ctx] cache rows of the context; None: chunk is all
    mask: torch.Tensor | None  # [q, ctx] bool, True = attend; None: plain causal


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [kv_heads * T] cache rows where the new tokens' K/V go, head-major
    num_decodes: int
    decode_slots: torch.Tensor | None  # [kv_heads * B * L] cache rows of the decode contexts, padded to L
    decode_bias: torch.Tensor | None  # [kv_heads * B, 1, L] model dtype, 0 where attended, -inf on padding
    prefills: list[PrefillChunk]
    # The kernel path instead of the two above: block tables, their rows and context lengths, int32.
    decode_tables: torch.Tensor | None = None  # [B, max_blocks]
    decode_rows: torch.Tensor | None = None  # [B]: 0..B-1
    decode_lens: torch.Tensor | None = None  # [B]
    block_size: int = 0
    # FlexAttention's path instead (flex_paged.py): attend(q, k_cache, v_cache) -> decode outputs.
    flex_decode: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # Prefill chunks through the CPU kernel (prefill_kernel.py); it reads a chunk's mask as what the
    # runner builds it to be: causal, the chunk's rows being the context's last positions.
    prefill_kernel: bool = False


class KVCache:
    """Per-layer key and value tensors, each [kv_heads, num_blocks * block_size, head_dim], all views of
    one tensor `store` [2 * layers, kv_heads, slots, head_dim] (layer i's keys at 2i, values at 2i + 1),
    so one indexed copy moves a block of every layer at once (kv/block_copier.py)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        slots = num_blocks * block_size
        self.block_size = block_size
        self.num_blocks = num_blocks
        # Zero (a padded read of a never-written slot must not meet NaN) and committed as used.
        self.store = lazy_zeros((2 * num_layers, kv_heads, slots, head_dim), dtype, device)
        self.k = [self.store[2 * i] for i in range(num_layers)]
        self.v = [self.store[2 * i + 1] for i in range(num_layers)]
        self._head_offsets = torch.arange(kv_heads, device=device).unsqueeze(1) * slots

    def block_view(self) -> torch.Tensor:
        """[num_blocks, 2 * layers * kv_heads, block_size * head_dim]: a strided view in which one index
        along dim 0 addresses a whole block of every layer."""
        planes, kv_heads, _, d = self.store.shape
        return self.store.view(planes * kv_heads, self.num_blocks, self.block_size * d).transpose(0, 1)

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Slot numbers [n] -> row numbers [kv_heads * n] of the flattened [kv_heads * slots, D] view."""
        return (self._head_offsets + slots.unsqueeze(0)).flatten()

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """q: [T, heads, D]; k, v: [T, kv_heads, D] (this iteration's new entries). Returns [T, heads, D]."""
    kv_heads, _, d = k_cache.shape
    k_rows, v_rows = k_cache.view(-1, d), v_cache.view(-1, d)
    k_rows.index_copy_(0, meta.slot_mapping, k.transpose(0, 1).reshape(-1, d))
    v_rows.index_copy_(0, meta.slot_mapping, v.transpose(0, 1).reshape(-1, d))
    nd = meta.num_decodes
    decoded = None
    if nd:
        if meta.flex_decode is not None:
            decoded = meta.flex_decode(q[:nd], k_cache, v_cache)
        elif meta.decode_tables is not None:
            decoded = torch.ops.conserve.paged_attention(q[:nd], k_cache, v_cache, meta.decode_tables,
                                                         meta.decode_rows, meta.decode_lens, meta.block_size,
                                                         d ** -0.5)
        else:
            decoded = _decode_attention(q[:nd], k_cache, v_cache, meta.decode_slots, meta.decode_bias)
        if not meta.prefills:
            return decoded
    out = torch.empty_like(q)
    if decoded is not None:
        out[:nd] = decoded
    for chunk in meta.prefills:
        qc = q[chunk.start:chunk.end].transpose(0, 1)  # [heads, q, D]
        if chunk.context_slots is None:
            kc, vc = k[chunk.start:chunk.end].transpose(0, 1), v[chunk.start:chunk.end].transpose(0, 1)
        else:
            kc = k_rows.index_select(0, chunk.context_slots).view(kv_heads, -1, d)  # [kv_heads, ctx, D]
            vc = v_rows.index_select(0, chunk.context_slots).view(kv_heads, -1, d)
        if meta.prefill_kernel:
            out[chunk.start:chunk.end] = torch.ops.conserve.prefill_attention(q[chunk.start:chunk.end], kc, vc,
                                                                              d ** -0.5)
            continue
        o = _sdpa(qc, kc, vc, chunk.mask, causal=chunk.mask is None)
        out[chunk.start:chunk.end] = o.transpose(0, 1)
    return out


def _decode_attention(q, k_cache, v_cache, slots, bias):
    # One query token per request. The query heads sharing a KV head form a tiny [group, D] matrix,
    # so attention is two batched matmuls over (kv_head, request) pairs. Softmax accumulates in
    # float32 internally even for bfloat16 scores.
    b, heads, d = q.shape
    kv_heads = k_cache.shape[0]
    group = heads // kv_heads
    length = bias.shape[-1]
    kc = k_cache.view(-1, d).index_select(0, slots).view(kv_heads * b, length, d)
    vc = v_cache.view(-1, d).index_select(0, slots).view(kv_heads * b, length, d)
    qg = q.view(b, kv_heads, group, d).transpose(0, 1).reshape(kv_heads * b, group, d)
    scores = torch.baddbmm(bias, qg, kc.transpose(1, 2), alpha=d ** -0.5)
    o = torch.bmm(scores.softmax(dim=-1), vc)  # [kv_heads * B, group, D]
    return o.view(kv_heads, b, group, d).transpose(0, 1).reshape(b, heads, d)


def _sdpa(q, k, v, mask, causal):
    # q: [heads, q, D]; k, v: [kv_heads, ctx, D]. A leading batch dimension of 1 lets the CPU flash
    # kernel split work over heads (measured ~2x faster than the same call on 3-D inputs).
    q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    if q.shape[1] != k.shape[1]:
        if _HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)[0]
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)[0]
