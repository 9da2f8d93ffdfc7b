"""The bfloat16 matmul kernel (gemm_bf16.cpp) against float64 matmuls of the same bf16 values: row counts
around its register block (8) and row group (64), output widths that end inside a panel (48 columns),
bias, strided rows; and the model packing its projections with it (`--gemm-kernel auto`) or not."""

from __future__ import annotations

import pytest
import torch

from conserve.config import EngineConfig
from conserve.model import gemm_kernel
from conserve.model.gemm_kernel import PanelWeight


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if not gemm_kernel.load(EngineConfig().kernel_cache_dir):
        pytest.skip("no AVX512-BF16 (or no C++ compiler) for the matmul kernel")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 33, 64, 65, 200])
@pytest.mark.parametrize("n,k", [(960, 576), (100, 64), (49, 34)])
def test_matches_float64(rows, n, k):
    gen = torch.Generator().manual_seed(rows * n)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    out = PanelWeight(w).matmul(x)
    ref = x.double() @ w.double().t()
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    assert relative_error(out, ref) < 8e-3  # one bf16 rounding of the output


def test_bias_and_strided_rows():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(50, 64, generator=gen).to(torch.bfloat16)
    bias = torch.randn(50, generator=gen).to(torch.bfloat16)
    wide = torch.randn(5, 100, generator=gen).to(torch.bfloat16)
    x = wide[:, 10:74]  # a view: row stride 100
    out = PanelWeight(w).matmul(x, bias)
    ref = x.double() @ w.double().t() + bias.double()
    assert relative_error(out, ref) < 8e-3


def test_float32_input_is_rounded_to_bf16_first():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(48, 32, generator=gen).to(torch.bfloat16)
    x = torch.randn(3, 32, generator=gen)
    assert torch.equal(PanelWeight(w).matmul(x), PanelWeight(w).matmul(x.to(torch.bfloat16)))


def test_refuses_mismatched_shapes():
    packed = PanelWeight(torch.zeros(48, 32, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.conserve.linear_bf16(torch.zeros(2, 30, dtype=torch.bfloat16), packed.packed, 48, None)


def test_model_uses_panels_only_when_asked():
    from conserve.model.loader import load_model

    on = load_model(None, "bfloat16", load_format="dummy", max_model_len=64)
    off = load_model(None, "bfloat16", load_format="dummy", max_model_len=64, gemm_kernel="off")
    assert isinstance(on.model.layers[0].qkv, PanelWeight) and isinstance(on.model.lm_head, PanelWeight)
    assert on.model.layers[0].gate_up.gated and not on.model.layers[0].qkv.gated
    assert not isinstance(off.model.layers[0].qkv, PanelWeight)
    with pytest.raises(ValueError, match="gemm_kernel"):
        load_model(None, "bfloat16", load_format="dummy", max_model_len=64, gemm_kernel="maybe")


@pytest.mark.parametrize("rows", [1, 9, 70])
@pytest.mark.parametrize("inter", [96, 40])  # whole panels, and a half that ends inside one
def test_gated_packing(rows, inter):
    gen = torch.Generator().manual_seed(rows + inter)
    w = (torch.randn(2 * inter, 64, generator=gen) * 0.3).to(torch.bfloat16)
    x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
    gated = PanelWeight(w, gated=True)
    # matmul gives [gate | up] exactly as the plain packing does.
    assert torch.equal(gated.matmul(x), PanelWeight(w).matmul(x))
    both = x.double() @ w.double().t()
    ref = torch.nn.functional.silu(both[:, :inter]) * both[:, inter:]
    out = gated.silu_matmul(x)
    assert out.shape == (rows, inter)
    assert relative_error(out, ref) < 8e-3
