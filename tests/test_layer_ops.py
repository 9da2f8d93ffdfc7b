"""The fused CPU layer ops (layer_ops.cpp) against the eager torch ops they replace, computed in float64:
the rotate-half rotary embedding applied in place to q/k heads that are strided views of one fused
projection output, as the layer body hands them over."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conserve.config import EngineConfig
from conserve.model import layer_ops
from conserve.model.rope import apply_rotary


@pytest.fixture(scope="module")
def ops():
    if not layer_ops.load(EngineConfig().kernel_cache_dir):
        pytest.skip("no C++ compiler for the layer ops")
    return torch.ops.conserve


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_rotary_in_place_on_strided_heads(ops, dtype, tol):
    t, heads, kv_heads, d = 19, 9, 3, 64
    gen = torch.Generator().manual_seed(1)
    fused = torch.randn(t, (heads + 2 * kv_heads) * d, generator=gen).to(dtype)
    angles = torch.rand(t, d // 2, generator=gen) * 100
    cos, sin = angles.cos(), angles.sin()
    qk = fused[:, : (heads + kv_heads) * d].view(t, -1, d)
    v_before = fused[:, (heads + kv_heads) * d:].clone()
    ref = apply_rotary(qk.double(), cos.double().unsqueeze(1), sin.double().unsqueeze(1))
    ops.rotary_(qk, cos, sin)
    assert (qk.double() - ref).abs().max() < tol
    assert torch.equal(fused[:, (heads + kv_heads) * d:], v_before)  # v, beside it in the row, untouched


def test_rotary_refuses_tables_of_the_wrong_shape(ops):
    with pytest.raises(RuntimeError, match="cos and sin"):
        ops.rotary_(torch.zeros(4, 2, 8), torch.zeros(4, 3), torch.zeros(4, 3))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rows", [1, 40])
def test_rms_norm_to(ops, dtype, tol, rows):
    gen = torch.Generator().manual_seed(3)
    h, w = torch.randn(rows, 576, generator=gen) * 3, torch.rand(576, generator=gen) + 0.5
    ref = F.rms_norm(h.double(), (576,), w.double(), 1e-5)
    out = ops.rms_norm_to(h, w, 1e-5, dtype)
    assert out.dtype == dtype and out.shape == h.shape
    assert ((out.double() - ref).abs() / (ref.abs() + 1)).max() < tol


@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_add_rms_norm(ops, y_dtype, dtype, tol):
    gen = torch.Generator().manual_seed(4)
    h, w = torch.randn(7, 576, generator=gen) * 3, torch.rand(576, generator=gen) + 0.5
    y = torch.randn(7, 576, generator=gen).to(y_dtype)
    total, out = ops.add_rms_norm(h, y, w, 1e-5, dtype)
    assert torch.equal(total, h + y)  # the residual stream exactly as eager's type-promoting add
    ref = F.rms_norm(total.double(), (576,), w.double(), 1e-5)
    assert out.dtype == dtype and ((out.double() - ref).abs() / (ref.abs() + 1)).max() < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("inter", [1536, 40])  # SmolLM2's width, and one that ends in a partial vector
def test_silu_mul(ops, dtype, tol, inter):
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(5, 2 * inter, generator=gen) * 6).to(dtype)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # saturated both ways, and zero
    gate, up = x.double().chunk(2, dim=-1)
    ref = F.silu(gate) * up
    out = ops.silu_mul(x)
    assert out.dtype == dtype and out.shape == (5, inter)
    assert torch.isfinite(out).all()
    assert ((out.double() - ref).abs() / (ref.abs() + 1)).max() < tol
