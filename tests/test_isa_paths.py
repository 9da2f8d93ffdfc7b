"""The AVX2-only machine's path, tested on any x86 machine. A CPU without AVX-512 or native bf16 makes
other choices (dtype `auto` is float32, so quantised matmuls run with float32 activations; the paged
kernel is built for AVX2; torch and oneDNN dispatch their AVX2 kernels). CONSERVE_CPU_ISA=avx2 plus
torch's own switches force those choices here, and the same numerics tests run under them in a fresh
process (torch reads its switches once, at import)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conserve import machine
from conserve.model.loader import resolve_dtype

ROOT = Path(__file__).resolve().parent.parent
AVX2_ENV = {machine.FORCED_ISA_ENV: "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
forced_here = os.environ.get(machine.FORCED_ISA_ENV) == "avx2"
x86 = "avx2" in machine.cpu_flags() or forced_here


@pytest.fixture
def forced_isa(monkeypatch):
    def force(value: str) -> None:
        monkeypatch.setenv(machine.FORCED_ISA_ENV, value)
        machine.cpu_flags.cache_clear()
    yield force
    monkeypatch.delenv(machine.FORCED_ISA_ENV)
    machine.cpu_flags.cache_clear()


def test_forced_avx2_hides_avx512_and_native_bf16(forced_isa):
    native_key, native_has_avx512 = machine.machine_key(), "avx512f" in machine.isa()
    forced_isa("avx2")
    assert not any(f.startswith(("avx512", "amx")) for f in machine.cpu_flags())
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert machine.compiler_arch_flag() == "-march=x86-64-v3"
    if native_has_avx512:
        assert native_key != machine.machine_key()  # caches of timings never mix the two


def test_unknown_forced_isa_is_refused(forced_isa):
    forced_isa("sse2")
    with pytest.raises(ValueError, match="CONSERVE_CPU_ISA"):
        machine.cpu_flags()


@pytest.mark.skipif(not forced_here, reason="runs inside the forced-AVX2 process of the test below")
def test_auto_choices_on_the_avx2_path(llm_fp32):
    """dtype auto is float32 with the file's 4-bit weights quantised, and its greedy tokens agree with
    the dense float32 reference as the explicit int4 path's do."""
    from conserve import LLM
    from test_quant_agreement import FLOORS, PREFIX, prompts, run

    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    llm = LLM(max_num_batched_tokens=48, kv_cache_gb=0.25, scheduler="fcfs")
    model = llm.engine.runner.model
    assert model.dtype == torch.float32 and model.lm_head_quant is not None
    assert llm.engine.runner.paged_kernel
    ids = prompts(llm_fp32)
    ref_tokens, _ = run(llm_fp32, ids)
    tokens, _ = run(llm, ids)
    prefix_same = sum(t[:PREFIX] == r[:PREFIX] for t, r in zip(tokens, ref_tokens)) / len(ids)
    print(f"\nAVX2 path, dtype auto: first {PREFIX} greedy tokens agree on {prefix_same:.0%} of prompts")
    assert prefix_same >= FLOORS["int4"][1]


@pytest.mark.slow
@pytest.mark.skipif(forced_here or not x86, reason="already forced, or not an x86 CPU")
def test_numerics_hold_on_the_forced_avx2_path():
    # float32 only: with bf16 emulated on AVX2, the bf16 cases would take minutes and test nothing new.
    tests = ["tests/test_paged_kernel.py", "tests/test_prefill_kernel.py", "tests/test_logits_ops.py", "tests/test_layer_ops.py",
             "tests/test_quant_agreement.py",
             "tests/test_isa_paths.py::test_auto_choices_on_the_avx2_path"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-k", "not bfloat16", *tests]
    done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **AVX2_ENV), capture_output=True, text=True,
                          timeout=900)
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-25:])
    print(tail)
    assert done.returncode == 0, tail
    summary = [line for line in tail.splitlines() if " passed" in line][-1]
    assert "skipped" not in summary, summary  # every selected test ran on the forced path
