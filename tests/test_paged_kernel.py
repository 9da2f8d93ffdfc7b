"""The CPU paged-attention kernel, and FlexAttention's paged decode (CUDA's in-place path, run eagerly
here), against plain softmax attention over gathered contexts: ragged lengths (partial last blocks,
one long context among short ones), shuffled block tables, GQA, and the dtypes the model runs in.
Uses the engine's default kernel cache, so the build (seconds) is shared."""

from __future__ import annotations

import pytest
import torch

from conserve.config import EngineConfig
from conserve.model import paged_kernel

KV_HEADS, HEADS, D, BS, BLOCKS = 3, 9, 64, 16, 64


@pytest.fixture(scope="module")
def kernel():
    if not paged_kernel.load(EngineConfig().kernel_cache_dir):
        pytest.skip("no C++ compiler for the paged-attention kernel")
    return torch.ops.conserve.paged_attention


def reference(q, k_cache, v_cache, tables, lengths):
    out = []
    for row, n in enumerate(lengths):
        slots = (torch.tensor(tables[row]).unsqueeze(1) * BS + torch.arange(BS)).flatten()[:n]
        k, v = k_cache[:, slots].double(), v_cache[:, slots].double()  # [kv_heads, n, D]
        qg = q[row].double().view(KV_HEADS, HEADS // KV_HEADS, D)
        p = (torch.einsum("hgd,hnd->hgn", qg, k) * D ** -0.5).softmax(-1)
        out.append(torch.einsum("hgn,hnd->hgd", p, v).reshape(HEADS, D))
    return torch.stack(out)


def paged_case(dtype, lengths):
    """Random caches, block tables over shuffled blocks, padded tables and queries."""
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(KV_HEADS, BLOCKS * BS, D, generator=gen).to(dtype)
    v_cache = torch.randn(KV_HEADS, BLOCKS * BS, D, generator=gen).to(dtype)
    order = torch.randperm(BLOCKS, generator=gen).tolist()
    tables, used = [], 0
    for n in lengths:
        blocks = -(-n // BS)
        tables.append(order[used:used + blocks])
        used += blocks
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(len(lengths), HEADS, D, generator=gen).to(dtype)
    return k_cache, v_cache, tables, padded, q


LENGTHS = [1, 16, 17, 5, 300, 33]  # one block, a full block, a partial second, ..., a long one


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_kernel_matches_reference(kernel, dtype, tol):
    lengths = LENGTHS
    k_cache, v_cache, tables, padded, q = paged_case(dtype, lengths)
    # Rows may share a sequence (prefill rows at successive positions): row 1 reads seq 4's table.
    seq_ids = torch.tensor([0, 4, 2, 3, 4, 5], dtype=torch.int32)
    lens = torch.tensor(lengths, dtype=torch.int32)
    out = kernel(q, k_cache, v_cache, padded, seq_ids, lens, BS, D ** -0.5)
    ref = reference(q, k_cache.float(), v_cache.float(), [tables[i] for i in seq_ids.tolist()], lengths)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.double() - ref).abs().max() < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_flex_decode_matches_reference(dtype, tol):
    from conserve.model.flex_paged import FlexDecode, available

    if not available():
        pytest.skip("no FlexAttention in this torch")
    k_cache, v_cache, tables, padded, q = paged_case(dtype, LENGTHS)
    flex = FlexDecode(torch.device("cpu"))
    meta = flex.metadata(padded, torch.tensor(LENGTHS), BLOCKS, BS, D)
    out = flex(q, k_cache, v_cache, meta)
    ref = reference(q, k_cache.float(), v_cache.float(), tables, LENGTHS)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.double() - ref).abs().max() < tol
    assert flex.works(dtype)
