"""Decode attention through FlexAttention, reading KV blocks where they lie in the cache (for CUDA).

The cache's layer tensor [kv_heads, slots, head_dim] is FlexAttention's key/value layout with a batch
of one, shared by every request; each decode query is its own batch entry. A block mask built once
per step from the block tables tells the kernel which cache blocks each request reads (so a long
context costs only its own reads); `mask_mod` keeps a request to its own blocks and to positions
before its length, through two small per-block maps (owner request, position in its table).

On CUDA the call is compiled (torch.compile, dynamic shapes) into a Triton kernel; if that fails the
first time, the runner falls back to the padded gather (attention.py) and says so in the log. On CPU
it runs eagerly (scores materialised: for tests against the gather path, not for speed; the C++
kernel is the CPU's in-place path).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch < 2.5
    BlockMask = flex_attention = None

_Q_BLOCK = 128  # one query block covers the single query of each batch entry


def available() -> bool:
    return flex_attention is not None


@dataclass
class FlexDecodeMeta:
    block_mask: object
    scale: float


class FlexDecode:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._attend = flex_attention
        if device.type == "cuda":
            self._attend = torch.compile(flex_attention, dynamic=True)

    def metadata(self, tables: torch.Tensor, lengths: torch.Tensor, num_blocks: int, block_size: int,
                 head_dim: int) -> FlexDecodeMeta:
        """tables: [B, W] block numbers (padded), lengths: [B] context lengths, both on the device."""
        b, width = tables.shape
        used = (lengths + block_size - 1) // block_size
        column = torch.arange(width, device=tables.device)
        valid = column.unsqueeze(0) < used.unsqueeze(1)
        # Per cache block: which request reads it and where in its table (entry num_blocks: padding).
        target = torch.where(valid, tables.long(), num_blocks).flatten()
        owner = torch.full((num_blocks + 1,), -1, dtype=torch.long, device=tables.device)
        logical = torch.zeros(num_blocks + 1, dtype=torch.long, device=tables.device)
        owner.index_copy_(0, target, torch.arange(b, device=tables.device).repeat_interleave(width))
        logical.index_copy_(0, target, column.repeat(b))
        lens = lengths.long()

        def mask_mod(batch, head, q_idx, kv_idx):
            block = kv_idx // block_size
            return (owner[block] == batch) & (logical[block] * block_size + kv_idx % block_size < lens[batch])

        mask = BlockMask.from_kv_blocks(used.view(b, 1, 1).to(torch.int32), tables.view(b, 1, 1, width).to(torch.int32),
                                        BLOCK_SIZE=(_Q_BLOCK, block_size), mask_mod=mask_mod,
                                        seq_lengths=(1, num_blocks * block_size), compute_q_blocks=False)
        return FlexDecodeMeta(mask, head_dim ** -0.5)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: FlexDecodeMeta) -> torch.Tensor:
        """q: [B, heads, D]; caches [kv_heads, slots, D]. Returns [B, heads, D]."""
        out = self._attend(q.unsqueeze(2), k_cache.unsqueeze(0), v_cache.unsqueeze(0), block_mask=meta.block_mask,
                           scale=meta.scale, enable_gqa=q.shape[1] != k_cache.shape[0])
        return out.squeeze(2)

    def works(self, dtype: torch.dtype) -> bool:
        """Compile (on CUDA) and check against plain attention on a small paged case; False, logged,
        when FlexAttention cannot run here."""
        try:
            gen = torch.Generator(device=self.device).manual_seed(0)
            kv_heads, heads, d, bs, blocks = 2, 4, 64, 16, 8
            k, v = (torch.randn(kv_heads, blocks * bs, d, generator=gen, device=self.device).to(dtype)
                    for _ in range(2))
            q = torch.randn(2, heads, d, generator=gen, device=self.device).to(dtype)
            tables = torch.tensor([[5, 2, 0], [1, 6, 3]], device=self.device)
            lengths = torch.tensor([20, 40], device=self.device)
            got = self(q, k, v, self.metadata(tables, lengths, blocks, bs, d)).float()
            for i, (row, n) in enumerate(zip(tables.tolist(), lengths.tolist())):
                slots = (torch.tensor(row, device=self.device).unsqueeze(1) * bs
                         + torch.arange(bs, device=self.device)).flatten()[:n]
                kk = k[:, slots].float().repeat_interleave(heads // kv_heads, 0)
                vv = v[:, slots].float().repeat_interleave(heads // kv_heads, 0)
                ref = torch.softmax(q[i].float().unsqueeze(1) @ kk.transpose(1, 2) * d ** -0.5, -1) @ vv
                if not torch.allclose(got[i], ref.squeeze(1), atol=2e-2, rtol=2e-2):
                    log.warning("FlexAttention paged decode disagrees with plain attention: not used")
                    return False
            return True
        except Exception as e:  # a compiler or kernel failure: the gather path still works
            log.warning("FlexAttention paged decode unavailable (%s: %s)", type(e).__name__, str(e)[:300])
            return False
