"""The CPU prefill-attention kernel against causal softmax attention in float64: whole prompts and chunks
after a context, lengths around its tiles (32 query positions, 64 keys), GQA, the head sizes it is built
for, K/V read through strided views (as the layer body's fused projection hands them over), and the
dtypes the model runs in. Uses the engine's default kernel cache, so the build (seconds) is shared."""

from __future__ import annotations

import pytest
import torch

from conserve.config import EngineConfig
from conserve.model import prefill_kernel


@pytest.fixture(scope="module")
def kernel():
    if not prefill_kernel.load(EngineConfig().kernel_cache_dir):
        pytest.skip("no C++ compiler for the prefill-attention kernel")
    return torch.ops.conserve.prefill_attention


def reference(q, k, v):
    """q: [T, heads, D]; k, v: [kv_heads, ctx, D]; the T rows are the context's last positions."""
    t, heads, d = q.shape
    kv_heads, ctx, _ = k.shape
    qg = q.double().view(t, kv_heads, heads // kv_heads, d)
    scores = torch.einsum("thgd,hnd->thgn", qg, k.double()) * d ** -0.5
    visible = torch.arange(ctx).unsqueeze(0) <= (torch.arange(t) + ctx - t).unsqueeze(1)  # [T, ctx]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = torch.einsum("thgn,hnd->thgd", scores.softmax(-1), v.double())
    return out.reshape(t, heads, d)


def case(rows, ctx, heads, kv_heads, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, d, generator=gen).to(dtype)
    k = torch.randn(kv_heads, ctx, d, generator=gen).to(dtype)
    v = torch.randn(kv_heads, ctx, d, generator=gen).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows,ctx", [(1, 1), (5, 5), (32, 32), (33, 33), (100, 100), (1, 300), (70, 300),
                                      (64, 129)],
                         ids=["one", "short", "a-tile", "tile+1", "prompt", "one-after-context", "chunk",
                              "key-tile+1"])
def test_matches_causal_reference(kernel, dtype, tol, rows, ctx):
    q, k, v = case(rows, ctx, 9, 3, 64, dtype)
    out = kernel(q, k, v, 64 ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.double() - reference(q.float(), k.float(), v.float())).abs().max() < tol


@pytest.mark.parametrize("heads,kv_heads,d", [(8, 2, 128), (4, 4, 96), (12, 3, 64)])
def test_head_shapes(kernel, heads, kv_heads, d):
    q, k, v = case(45, 80, heads, kv_heads, d, torch.float32, seed=1)
    out = kernel(q, k, v, d ** -0.5)
    assert (out.double() - reference(q, k, v)).abs().max() < 1e-5


def test_reads_strided_views(kernel):
    """As the layer body hands them over: q, k and v slices of one fused [T, (heads + 2 kv_heads) * D] row,
    k and v transposed to [kv_heads, T, D] views."""
    t, heads, kv_heads, d = 40, 9, 3, 64
    fused = torch.randn(t, (heads + 2 * kv_heads) * d, generator=torch.Generator().manual_seed(2))
    q = fused[:, : heads * d].view(t, heads, d)
    k = fused[:, heads * d:(heads + kv_heads) * d].view(t, kv_heads, d).transpose(0, 1)
    v = fused[:, (heads + kv_heads) * d:].view(t, kv_heads, d).transpose(0, 1)
    out = kernel(q, k, v, d ** -0.5)
    assert (out.double() - reference(q, k.contiguous(), v.contiguous())).abs().max() < 1e-5


def test_refuses_what_it_cannot_read(kernel):
    q, k, v = case(10, 5, 9, 3, 64, torch.float32)
    with pytest.raises(RuntimeError, match="context must include"):
        kernel(q, k, v, 0.125)
    q, k, v = case(4, 4, 9, 3, 80, torch.float32)
    with pytest.raises(RuntimeError, match="head size 80"):
        kernel(q, k, v, 0.125)
