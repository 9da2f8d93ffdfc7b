"""Weight-only int8/int4 matmuls: kernels against their dequantised weights, which weights each
mode quantises, the start-up cross-over measurement and its per-CPU cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conserve.config import EngineConfig
from conserve.model import quant, quant_tuning
from conserve.model.config import ModelConfig
from conserve.model.int4 import GROUP, Int4Weight, int4_kernels_available, quantize_q4
from conserve.model.int8 import Int8Weight
from conserve.model.llama import LlamaModel

pytestmark = pytest.mark.skipif(not (int4_kernels_available() and quant.int8_kernels_available()),
                                reason="torch lacks the int8/int4 CPU kernels")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matmul_matches_its_dequantised_weights(dtype):
    torch.manual_seed(0)
    w = Int8Weight(torch.randn(100, 64))
    x = torch.randn(5, 64).to(dtype)
    y = w.matmul(x)
    assert y.dtype == dtype and y.shape == (5, 100)
    # The kernel rounds activations and scales to bfloat16: within bfloat16 rounding of the exact product.
    assert rel_err(y, x.float() @ w.dequantize().t()) < 1e-2


def test_int8_quantisation_error_is_half_a_step_at_most():
    torch.manual_seed(1)
    dense = torch.randn(48, 32)
    dense[3] = 0  # an all-zero row stays zero, not NaN
    w = Int8Weight(dense)
    step = w.scale.float()[:, None]
    assert torch.all(step[[0, 1, 2, 4]] <= dense.abs().amax(1, keepdim=True)[[0, 1, 2, 4]] / 125)
    assert torch.all((w.dequantize() - dense).abs() <= step * 0.5 + 1e-6)
    assert torch.all(w.dequantize()[3] == 0)


def test_int8_refuses_widths_the_kernel_gets_wrong():
    assert Int8Weight.supports(100, 64) and not Int8Weight.supports(96, 70)
    assert quant.build("int8", torch.randn(96, 70), []) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_from_dense_matches_its_groups(dtype):
    torch.manual_seed(2)
    dense = torch.randn(32, 128)
    blocks = quantize_q4(dense)
    groups = torch.from_numpy(blocks.q.astype(np.float32)).reshape(32, -1, GROUP)
    deq = ((groups - 8) * torch.from_numpy(blocks.scale)[..., None]
           + torch.from_numpy(blocks.zero)[..., None]).reshape(32, 128)
    step = torch.from_numpy(blocks.scale).repeat_interleave(GROUP, dim=1)
    assert torch.all((deq - dense).abs() <= step * 0.5 + 1e-5)
    w = Int4Weight([blocks])
    x = torch.randn(3, 128).to(dtype)
    y = w.matmul(x)
    assert y.dtype == dtype
    assert rel_err(y, x.float() @ deq.t()) < 2e-2  # scales and zeros are rounded to bfloat16


@pytest.mark.parametrize("mode, file_types, expect", [
    ("none", ["Q4_1"], None), ("auto", [None, None], None), ("auto", ["Q4_1", "Q4_0"], "int4"),
    ("auto", ["Q8_0", "Q4_1"], "int8"), ("auto", ["Q8_0"], "int8"), ("auto", ["F32"], None),
    ("int8", ["Q4_1"], "int8"), ("int4", [None], "int4"),
])
def test_projection_kind(mode, file_types, expect):
    assert quant.projection_kind(mode, file_types) == expect


def test_lm_head_is_never_int4():
    assert quant.lm_head_kind("int4", None) == "int8"
    assert quant.lm_head_kind("auto", "Q8_0") == "int8"
    assert quant.lm_head_kind("auto", None) is None
    assert quant.lm_head_kind("none", "Q8_0") is None


def test_int4_flag_is_a_deprecated_alias():
    assert EngineConfig(int4="off").quantization == "none"
    assert EngineConfig(int4="auto").quantization == "auto"
    assert EngineConfig(quantization="int8").quantization == "int8"
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int3")
    with pytest.raises(ValueError, match="contradicts"):
        EngineConfig(int4="off", quantization="int4")
    with pytest.raises(ValueError, match="quant_max_tokens"):
        EngineConfig(quant_max_tokens=-1)


def tiny_model(mode: str, dtype: torch.dtype = torch.float32) -> LlamaModel:
    config = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 96, "hidden_size": 64,
                                  "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "tie_word_embeddings": True})
    net = LlamaModel(config, dtype, torch.device("cpu"))
    torch.manual_seed(3)
    for name in net._expected_names():
        net.load_weight(name, torch.randn(net._target(name).shape) * 0.1)
    net.finish_loading("tiny", 64, mode)
    return net


def test_modes_quantise_the_projections_and_lm_head():
    assert tiny_model("none").quant_tag() == "" and not tiny_model("auto").layer_projections()  # HF: dense
    int8 = tiny_model("int8")
    assert {type(q) for _, q in int8.layer_projections()} == {Int8Weight}
    assert len(int8.layer_projections()) == 8 and isinstance(int8.lm_head_quant, Int8Weight)
    int4 = tiny_model("int4")
    assert {type(q) for _, q in int4.layer_projections()} == {Int4Weight}
    assert isinstance(int4.lm_head_quant, Int8Weight)


def quant_wins_below(limit: int):
    """A fake _time: the quantised pass takes half the dense time up to `limit` tokens, twice it after."""
    def fake(group, inputs, use_quant):
        tokens = next(iter(inputs.values())).shape[0]
        return (0.5 if tokens <= limit else 2.0) if use_quant else 1.0
    return fake


def test_crossover_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    net = tiny_model("int8")
    monkeypatch.setattr(quant_tuning, "_time", quant_wins_below(4))
    first = quant_tuning.tune(net, tmp_path)
    files = list(tmp_path.glob("quant-*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["layers_max_tokens"] == first.layers_max_tokens == 4
    assert first.timings_ms["layers"] and first.timings_ms["layers"][0][0] == 1

    def no_measuring(*args):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(quant_tuning, "_crossover", no_measuring)
    assert quant_tuning.tune(net, tmp_path) == first
    # Another CPU model gets its own measurement.
    monkeypatch.setattr(quant_tuning, "machine_key", lambda: "other-cpu")
    with pytest.raises(AssertionError, match="measured again"):
        quant_tuning.tune(net, tmp_path)


def test_a_cached_verdict_that_no_longer_holds_is_measured_again(tmp_path, monkeypatch):
    # A cache written under a busy CPU said "never quantise"; at one token quantised now wins clearly.
    net = tiny_model("int8")
    path = quant_tuning.cache_file(tmp_path, net)
    path.write_text(json.dumps({"layers_max_tokens": 0, "lm_head_max_rows": 0, "timings_ms": {}}))
    monkeypatch.setattr(quant_tuning, "_time", quant_wins_below(2))
    tuning = quant_tuning.tune(net, tmp_path)
    assert tuning.layers_max_tokens == 2
    assert json.loads(path.read_text())["layers_max_tokens"] == 2


def test_a_measurement_cut_short_is_used_but_not_cached(tmp_path, monkeypatch):
    net = tiny_model("int8")
    monkeypatch.setattr(quant_tuning, "_time", quant_wins_below(2))
    monkeypatch.setattr(quant_tuning, "BUDGET_S", -1.0)  # past the deadline after the first round
    tuning = quant_tuning.tune(net, tmp_path)
    assert tuning.layers_max_tokens == 1 and not tuning.settled
    assert not list(tmp_path.glob("quant-*.json"))


def test_crossover_stops_where_quantised_loses(monkeypatch):
    net = tiny_model("int4")
    monkeypatch.setattr(quant_tuning, "_time", quant_wins_below(4))
    tuning = quant_tuning.tune(net, None)
    assert tuning.layers_max_tokens == 4
    assert [row[0] for row in tuning.timings_ms["layers"]] == [1, 2, 4, 8]


def test_quantised_lm_head_runs_only_up_to_the_chosen_rows():
    net = tiny_model("int8")
    net.lm_head_quant_max_rows = 2
    used = []
    original = net.lm_head_quant.matmul
    net.lm_head_quant.matmul = lambda x: (used.append(x.shape[0]), original(x))[1]
    hidden = torch.randn(3, 64)
    net.compute_logits(hidden)  # 3 rows > 2: the dense lm_head
    assert used == []
    logits_q = net.compute_logits(hidden[:2])
    assert used == [2]
    logits_d = torch.nn.functional.rms_norm(hidden[:2], (64,), net.norm, 1e-6) @ net.embed.t()
    # The best candidates are recomputed from the dense weights: top-1 is the dense one, exactly.
    top = logits_d.argmax(-1)
    assert torch.equal(logits_q.argmax(-1), top)
    assert torch.allclose(logits_q.gather(1, top[:, None]), logits_d.gather(1, top[:, None]), rtol=1e-5, atol=1e-5)
