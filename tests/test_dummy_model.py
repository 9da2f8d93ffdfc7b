"""--load-format dummy: a model from its config alone, random weights. The shipped 8B/14B configs are
checked on the meta device (shapes only, nothing allocated) against the published parameter counts."""

import json

import pytest
import torch

from conserve.cli import build_parser
from conserve.config import EngineConfig
from conserve.engine import Engine
from conserve.model.config import ModelConfig
from conserve.model.dummy import parameter_count, shipped_config, shipped_configs
from conserve.model.llama import LlamaModel
from conserve.model.loader import load_model
from conserve.sampling_params import SamplingParams

TINY = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 512, "tie_word_embeddings": False}

# Parameter counts published for the checkpoints these configs describe.
PUBLISHED = {"llama-3.1-8b": 8_030_261_248, "qwen2.5-14b": 14_770_033_664, "smollm2-135m": 134_515_008}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return path


def logits(loaded, ids):
    net = loaded.model
    with torch.inference_mode():
        hidden = net.embed[torch.tensor(ids)].float()
        return net.compute_logits(hidden)


def test_a_config_file_loads_with_deterministic_random_weights_and_a_byte_level_tokenizer(tiny_config):
    a = load_model(tiny_config, "float32", load_format="dummy")
    b = load_model(tiny_config, "float32", load_format="dummy")
    assert a.config.attention_bias and a.config.rope_theta == 1e6  # Qwen2: q/k/v biases, its own theta
    assert torch.equal(a.model.layers[1].qkv, b.model.layers[1].qkv)
    assert a.model.layers[0].qkv_bias is not None and not a.model.layers[0].qkv_bias.any()
    assert a.tokenizer.source == "byte-level" and a.tokenizer.vocab_size <= TINY["vocab_size"]
    assert torch.isfinite(logits(a, [1, 2, 3])).all()


def test_a_dummy_model_generates_context_dependent_text_its_tokenizer_can_decode(tiny_config):
    engine = Engine(EngineConfig(model=str(tiny_config), load_format="dummy", dtype="float32", scheduler="fcfs",
                                 kv_cache_gb=0.01))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = {}
    for rid, prompt in {"a": "hello there", "b": "something else entirely"}.items():
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = o.outputs[0].token_ids
    assert all(len(t) == 6 for t in outputs.values()) and outputs["a"] != outputs["b"]
    # Only ids its tokenizer can decode (vocabulary 300, byte-level tokenizer 258).
    assert all(t < engine.tokenizer.vocab_size for ids in outputs.values() for t in ids)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_configs_have_the_published_shapes(name):
    config = ModelConfig.from_hf(shipped_config(name), name)
    net = LlamaModel(config, torch.bfloat16, torch.device("meta"))  # shapes, no memory
    tensors = [net.embed, net.norm] + ([] if config.tie_word_embeddings else [net.lm_head])
    for layer in net.layers:
        tensors += [layer.input_norm, layer.qkv, layer.o, layer.post_norm, layer.gate_up, layer.down]
        tensors += [layer.qkv_bias] if layer.qkv_bias is not None else []
    assert sum(t.numel() for t in tensors) == parameter_count(config) == PUBLISHED[name]


def test_shipped_configs_are_listed_and_the_cli_takes_a_shape_by_name():
    assert set(PUBLISHED) <= set(shipped_configs())
    qwen = ModelConfig.from_hf(shipped_config("qwen2.5-14b"))
    assert qwen.attention_bias and qwen.rope_theta == 1e6 and qwen.num_kv_heads == 8
    args = build_parser().parse_args(["serve", "--model", "llama-3.1-8b", "--load-format", "dummy"])
    config = EngineConfig.from_flags(args)
    assert (config.model, config.load_format) == ("llama-3.1-8b", "dummy")
