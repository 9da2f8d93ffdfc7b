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


def reference(q, k_cache, v_cache, tables, lengths, bs=BS):
    kv_heads, d = k_cache.shape[0], k_cache.shape[-1]
    heads = q.shape[1]
    out = []
    for row, n in enumerate(lengths):
        slots = (torch.tensor(tables[row]).unsqueeze(1) * bs + torch.arange(bs)).flatten()[:n]
        k, v = k_cache[:, slots].double(), v_cache[:, slots].double()  # [kv_heads, n, d]
        qg = q[row].double().view(kv_heads, heads // kv_heads, d)
        p = (torch.einsum("hgd,hnd->hgn", qg, k) * d ** -0.5).softmax(-1)
        out.append(torch.einsum("hgn,hnd->hgd", p, v).reshape(heads, d))
    return torch.stack(out)


def paged_case(dtype, lengths, kv_heads=KV_HEADS, heads=HEADS, d=D, bs=BS, blocks=BLOCKS):
    """Random caches, block tables over shuffled blocks, padded tables and queries."""
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(kv_heads, blocks * bs, d, generator=gen).to(dtype)
    v_cache = torch.randn(kv_heads, blocks * bs, d, generator=gen).to(dtype)
    order = torch.randperm(blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in lengths:
        count = -(-n // bs)
        tables.append(order[used:used + count])
        used += count
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(len(lengths), heads, d, generator=gen).to(dtype)
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


# Head sizes, GQA groups and block sizes beside SmolLM2's (d 64, group 3, blocks of 16): Llama-3-8B's
# d 128 / group 4, no sharing, a group past the bf16 path's limit, larger blocks.
@pytest.mark.parametrize("kv_heads,heads,d,bs", [(8, 32, 128, 16), (2, 2, 64, 32), (1, 12, 64, 16), (2, 10, 96, 16)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_kernel_shapes(kernel, kv_heads, heads, d, bs, dtype, tol):
    lengths = [3, bs, 2 * bs + 1, 150]
    k_cache, v_cache, tables, padded, q = paged_case(dtype, lengths, kv_heads, heads, d, bs, blocks=24)
    lens = torch.tensor(lengths, dtype=torch.int32)
    out = kernel(q, k_cache, v_cache, padded, torch.arange(4, dtype=torch.int32), lens, bs, d ** -0.5)
    ref = reference(q, k_cache.float(), v_cache.float(), tables, lengths, bs)
    assert (out.double() - ref).abs().max() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slots_past_a_context_are_never_read(kernel, dtype):
    # Freed or never-written slots may hold anything: NaN there must not reach any output.
    lengths = [5, 17, 33]
    k_cache, v_cache, tables, padded, q = paged_case(dtype, lengths)
    poisoned_k, poisoned_v = torch.full_like(k_cache, float("nan")), torch.full_like(v_cache, float("nan"))
    for row, n in enumerate(lengths):
        slots = (torch.tensor(tables[row]).unsqueeze(1) * BS + torch.arange(BS)).flatten()[:n]
        poisoned_k[:, slots], poisoned_v[:, slots] = k_cache[:, slots], v_cache[:, slots]
    lens = torch.tensor(lengths, dtype=torch.int32)
    out = kernel(q, poisoned_k, poisoned_v, padded, torch.arange(3, dtype=torch.int32), lens, BS, D ** -0.5)
    assert torch.isfinite(out).all()
    assert torch.equal(out, kernel(q, k_cache, v_cache, padded, torch.arange(3, dtype=torch.int32), lens, BS,
                                   D ** -0.5))


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
