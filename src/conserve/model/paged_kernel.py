"""Build and load the CPU paged-attention kernel (paged_attention.cpp) as the op
`torch.ops.conserve.paged_attention`.

torch's own choices were measured first: FlexAttention compiled for CPU with a block mask over the
paged cache took 6-16 ms per layer for 32 decodes of 100 tokens (the gather + batched matmuls it
would replace: ~0.3 ms), and a ragged formulation in torch ops (eager or compiled by inductor) was
3-4x slower than the padded gather for equal lengths. So the kernel is a small C++ file compiled
with the system compiler at first use (~5-10 s) for this very CPU (-march=native; x86-64-v3 when CONSERVE_CPU_ISA=avx2) and cached by a
hash of its source, torch's version and the CPU; without a compiler the runner falls back to the
padded gather (attention.py) and says so in the log.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from conserve.machine import compiler_arch_flag, cpu_flags, cpu_model

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.cpp")
_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]  # + -march from conserve.machine
_loaded: bool | None = None


def _flags() -> list[str]:
    return [*_FLAGS, compiler_arch_flag()]


def available() -> bool:
    """Whether the op is loaded in this process."""
    return bool(_loaded)


def load(cache_dir: str | Path) -> bool:
    """Load the kernel, building it first if this machine has no cached build. Returns whether the op is
    usable; failures are logged once, never raised (the gather path still works)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    _loaded = False
    try:
        torch.ops.load_library(str(_build(Path(cache_dir).expanduser())))
        # Shapes for torch.compile's tracing: the output is shaped like the queries.
        torch.library.register_fake("conserve::paged_attention")(lambda q, *args: torch.empty_like(q))
        _loaded = True
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("paged-attention kernel unavailable (%s); decode attention gathers padded contexts", e)
    return _loaded


def _cpu_signature() -> str:
    """The CPU the build is for: its model and flags as conserve sees them (a forced AVX2 run hides
    AVX-512, so it gets a build of its own)."""
    return f"{cpu_model()}\n{' '.join(sorted(cpu_flags()))}"


def _build(cache_dir: Path) -> Path:
    source = SOURCE.read_text()
    key = hashlib.sha256("\n".join([source, torch.__version__, " ".join(_flags()), _cpu_signature()]).encode())
    target = cache_dir / f"paged_attention-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise OSError("no C++ compiler (g++ or $CXX) found")
    from torch.utils.cpp_extension import include_paths

    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: processes starting together never load a half-written file.
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *_flags(), f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in include_paths()),
               str(SOURCE), f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}", "-o", str(out)]
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(out, target)
    log.info("built the paged-attention kernel in %.1f s (%s)", time.perf_counter() - started, target)
    return target

