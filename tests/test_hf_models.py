"""Tiny random Llama / Qwen2 / Mistral checkpoints written by transformers, loaded by conserve from
the HF directory, checked against transformers' own forward pass (float32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conserve import LLM, ModelLoadError, SamplingParams  # noqa: E402

pytestmark = pytest.mark.reference

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
ARCHS = {
    "llama3-rope-untied": (transformers.LlamaConfig, dict(
        rope_theta=50000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    "qwen2-bias-tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True, rope_theta=10000.0)),
    "mistral": (transformers.MistralConfig, dict(tie_word_embeddings=False, sliding_window=None)),
}


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))


@pytest.fixture(scope="module", params=sorted(ARCHS))
def checkpoint(request, tmp_path_factory):
    config_cls, extra = ARCHS[request.param]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**COMMON, **extra), dtype=torch.float32)
    model.eval()
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder)
    return folder, model


def test_logits_and_greedy_tokens_match_transformers(checkpoint):
    folder, ref_model = checkpoint
    llm = LLM(model=str(folder), dtype="float32", max_num_batched_tokens=16, num_kv_blocks=64, scheduler="fcfs")
    prompts = [[1, 5, 9, 33, 17, 4, 80, 2, 45, 61, 7, 7, 12, 90, 3, 3, 44, 20, 21, 22, 23], [1, 70, 71]]
    seen = []
    model = llm.engine.runner.model
    original = model.compute_logits
    model.compute_logits = lambda h: (lambda lg: (seen.append(lg.clone()), lg)[1])(original(h))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        tokens = prompt + out.outputs[0].token_ids
        with torch.inference_mode():
            ref = ref_model(torch.tensor([tokens])).logits[0]
        expect = ref[len(prompt) - 1:-1].argmax(-1).tolist()
        assert out.outputs[0].token_ids == expect
    seen.clear()
    llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    with torch.inference_mode():
        ref_last = ref_model(torch.tensor([prompts[0]])).logits[0, -1]
    assert (seen[0][0] - ref_last).abs().max() / ref_last.abs().max() < 1e-4


def test_missing_weights_and_unsupported_arch_are_clear(checkpoint, tmp_path):
    folder, _ = checkpoint
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        LLM(model=str(broken), dtype="float32", num_kv_blocks=8)
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)
    write_tokenizer(broken)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        LLM(model=str(broken), dtype="float32", num_kv_blocks=8)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        LLM(model=str(broken), dtype="float32", num_kv_blocks=8)
