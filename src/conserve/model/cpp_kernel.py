"""Build and load one of conserve's CPU kernels (a C++ file beside this module defining ops in the
`conserve` torch library). A kernel is compiled with the system compiler at first use (~5-10 s) for this
very CPU (-march=native; x86-64-v3 when CONSERVE_CPU_ISA=avx2) and cached by a hash of its sources,
torch's version, the flags and the CPU. Failures are logged once, never raised: every kernel has a
torch fallback, which the caller names."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from conserve.machine import compiler_arch_flag, cpu_flags, cpu_model

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
HEADERS = (HERE / "kernel_common.h",)  # included by every kernel, so part of every build key
# -ffp-contract=fast: -std=c++17 would otherwise forbid fusing a * b + c into one FMA instruction.
_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c++17"]


def _flags() -> list[str]:
    return [*_FLAGS, compiler_arch_flag()]


def _cpu_signature() -> str:
    """The CPU the build is for: its model and flags as conserve sees them (a forced AVX2 run hides
    AVX-512, so it gets a build of its own)."""
    return f"{cpu_model()}\n{' '.join(sorted(cpu_flags()))}"


class CppKernel:
    """The ops `torch.ops.conserve.<op>` defined in `<name>.cpp`; `fakes` maps each op to a function
    giving its outputs' shapes for torch.compile's tracing; `fallback` says in the log what runs instead
    when it cannot be built."""

    def __init__(self, name: str, fakes: dict[str, Callable[..., torch.Tensor | None]], fallback: str) -> None:
        self.name, self.fakes, self.fallback = name, fakes, fallback
        self.source = HERE / f"{name}.cpp"
        self._loaded: bool | None = None

    def available(self) -> bool:
        """Whether the op is loaded in this process."""
        return bool(self._loaded)

    def load(self, cache_dir: str | Path) -> bool:
        """Load the op, building it first if this machine has no cached build. Returns whether it is usable."""
        if self._loaded is not None:
            return self._loaded
        self._loaded = False
        try:
            torch.ops.load_library(str(self._build(Path(cache_dir).expanduser())))
            for op, fake in self.fakes.items():
                torch.library.register_fake(f"conserve::{op}")(fake)
            self._loaded = True
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.warning("%s kernel unavailable (%s); %s", self.name, e, self.fallback)
        return self._loaded

    def _build(self, cache_dir: Path) -> Path:
        sources = [self.source.read_text(), *(h.read_text() for h in HEADERS)]
        key = hashlib.sha256("\n".join([*sources, torch.__version__, " ".join(_flags()), _cpu_signature()]).encode())
        target = cache_dir / f"{self.name}-{key.hexdigest()[:16]}.so"
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
                   f"-I{HERE}", str(self.source), f"-L{torch_lib}", "-lc10", "-ltorch_cpu",
                   f"-Wl,-rpath,{torch_lib}", "-o", str(out)]
            started = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise OSError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
            os.replace(out, target)
        log.info("built the %s kernel in %.1f s (%s)", self.name, time.perf_counter() - started, target)
        return target
