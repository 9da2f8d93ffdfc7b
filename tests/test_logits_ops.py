"""The logits kernels (logits_ops.cpp) against torch's argmax and topk: ties, -inf (banned tokens), NaN,
row lengths that are not a multiple of the vector width, strided rows (a vocabulary cut to the
tokenizer's), and the torch fallback where the kernel does not fit."""

from __future__ import annotations

import pytest
import torch

from conserve.config import EngineConfig
from conserve.model import logits_ops


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if not logits_ops.load(EngineConfig().kernel_cache_dir):
        pytest.skip("no C++ compiler for the logits kernels")


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 1000, 49152])
def test_argmax_matches_torch(vocab):
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(vocab))
    assert torch.equal(logits_ops.argmax_rows(logits, True), logits.argmax(dim=-1))


def test_argmax_first_of_ties_inf_and_nan():
    logits = torch.full((5, 128), float("-inf"))
    logits[1, [3, 20, 37]] = 2.0  # ties: the first wins, as in torch
    logits[2, 33] = float("inf")
    logits[3, [5, 30]] = float("nan")  # NaN counts as the largest: its first index
    logits[3, 10] = 9.0
    logits[4] = 1.0
    logits[4, 70] = float("inf")  # inf and -inf side by side: their sum is NaN, the values are not
    logits[4, 86] = float("-inf")
    expect = torch.tensor([0, 3, 33, 5, 70])
    assert torch.equal(logits_ops.argmax_rows(logits, True), expect)
    assert torch.equal(logits.argmax(dim=-1), expect)


def test_argmax_on_strided_rows():
    full = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    cut = full[:, :70]
    assert cut.stride(0) == 100
    assert torch.equal(logits_ops.argmax_rows(cut, True), cut.argmax(dim=-1))


@pytest.mark.parametrize("vocab,k", [(8, 8), (17, 3), (49152, 8), (1000, 64)])
def test_top_indices_match_torch(vocab, k):
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(k))
    ours = logits_ops.top_indices(logits, k, True)
    theirs = logits.topk(k, dim=-1)
    assert ours.shape == (6, k)
    # Distinct values: the same indices, in the same (descending) order.
    assert torch.equal(ours, theirs.indices)


def test_top_indices_skip_nan_and_prefer_finite():
    logits = torch.full((1, 50), float("-inf"))
    logits[0, [4, 9, 44]] = torch.tensor([1.0, 3.0, 2.0])
    logits[0, 20] = float("nan")
    assert logits_ops.top_indices(logits, 3, True).tolist() == [[9, 44, 4]]


def test_fallback_off_cpu_kernel_or_dtype():
    logits = torch.randn(3, 50, dtype=torch.float64)
    assert torch.equal(logits_ops.argmax_rows(logits, True), logits.argmax(dim=-1))
    assert torch.equal(logits_ops.top_indices(logits.float(), 4, False), logits.float().topk(4, dim=-1).indices)
