"""GGUF Q4 blocks reach torch's int4 kernel with the same values gguf's dequantiser gives."""

import numpy as np
import pytest
import torch

from conserve.model.int4 import GROUP, Int4Weight, int4_kernels_available, unpack_q4

pytestmark = pytest.mark.skipif(not int4_kernels_available(), reason="torch lacks int4 CPU kernels")


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_unpack_matches_gguf_dequantize(qtype):
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(0)
    weights = rng.standard_normal((32, 128)).astype(np.float32)
    kind = GGMLQuantizationType[qtype]
    raw = quants.quantize(weights, kind)
    expect = quants.dequantize(raw, kind).reshape(32, 128)
    blocks = unpack_q4(raw, qtype, 32, 128)
    groups = blocks.q.reshape(32, -1, GROUP).astype(np.float32)
    # torch's kernel computes (q - 8) * scale + zero.
    got = ((groups - 8) * blocks.scale[..., None] + blocks.zero[..., None]).reshape(32, 128)
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-6)


def test_int4_matmul_matches_dense_within_bf16_rounding():
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(1)
    weights = rng.standard_normal((48, 64)).astype(np.float32)
    raw = quants.quantize(weights, GGMLQuantizationType.Q4_1)
    dense = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q4_1).reshape(48, 64))
    w = Int4Weight([unpack_q4(raw, "Q4_1", 48, 64)])
    x = torch.randn(3, 64)
    got = w.matmul(x.to(torch.bfloat16)).float()
    ref = x @ dense.t()
    assert (got - ref).abs().max() / ref.abs().max() < 2e-2
    # A row permutation of the blocks permutes the outputs.
    order = np.arange(48)[::-1].copy()
    flipped = Int4Weight([unpack_q4(raw, "Q4_1", 48, 64).permute_rows(order)])
    assert torch.equal(flipped.matmul(x.to(torch.bfloat16)), w.matmul(x.to(torch.bfloat16))[:, order])
