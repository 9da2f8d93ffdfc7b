"""Load an HF model directory: config.json + *.safetensors (tokenizer files are the tokenizer's job)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from conserve.errors import ModelLoadError


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: not a model directory (no config.json)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot parse: {e}") from None


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"{index}: cannot parse: {e}") from None
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: shard(s) listed in {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors weights (only safetensors checkpoints are supported)")
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, None, None]]:
    """Yield (name, tensor, None, None) one at a time, so peak memory stays near one tensor over the
    model (the Nones: no 4-bit blocks, no GGUF storage type)."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name), None, None
        except ModelLoadError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ModelLoadError(f"{f}: cannot read safetensors file: {e}") from None
