"""What CPU this is: its model name and the instruction-set features that change kernel speed.

Timings (the latency model, benchmark reports) are only comparable on the same CPU: a fit made on an
AVX-512/bf16 machine badly mispredicts an AVX2-only one. Pure Python (reads /proc/cpuinfo).

CONSERVE_CPU_ISA=avx2 makes conserve treat this CPU as AVX2-only (no AVX-512, no native bf16): the
choices a slower machine makes (dtype `auto`, the paged kernel's build, cache keys) then run and are
tested here too. torch's own kernels need their switches before torch is imported:
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 (tests/test_isa_paths.py sets all three).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
from functools import lru_cache
from pathlib import Path

# Flags that change which kernels run and how fast, most capable first.
_ISA_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2", "neon", "asimd")
FORCED_ISA_ENV = "CONSERVE_CPU_ISA"
_FORCED_ISAS = ("native", "avx2")


def forced_isa() -> str:
    """"native" (use what the CPU has) or "avx2" (pretend AVX-512 and AMX are absent)."""
    value = os.environ.get(FORCED_ISA_ENV, "native").strip().lower() or "native"
    if value not in _FORCED_ISAS:
        raise ValueError(f"{FORCED_ISA_ENV}={value!r}: use one of {', '.join(_FORCED_ISAS)}")
    return value


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    family = re.search(r"^cpu family\s*:\s*(\d+)$", text, re.MULTILINE)
    model = re.search(r"^model\s*:\s*(\d+)$", text, re.MULTILINE)
    name = m.group(1).strip() if m else platform.machine()
    if family and model:  # virtual machines often report a bare "AMD EPYC" for several generations
        name += f" (family {family.group(1)} model {model.group(1)})"
    return name


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    m = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.MULTILINE)
    flags = frozenset(m.group(1).split()) if m else frozenset()
    if forced_isa() == "avx2":
        flags = frozenset(f for f in flags if not f.startswith(("avx512", "amx")))
    return flags


def compiler_arch_flag() -> str:
    """-march for kernels built at run time: this CPU, or the AVX2 level when that is forced."""
    return "-march=x86-64-v3" if forced_isa() == "avx2" else "-march=native"


def isa() -> str:
    """The speed-relevant ISA features present, e.g. "avx512f+avx512_bf16+avx2" or "avx2"."""
    present = [f for f in _ISA_FLAGS if f in cpu_flags()]
    return "+".join(present) or platform.machine()


def machine_key() -> str:
    """A short, file-name-safe key of CPU model and ISA: caches of timings are kept per key (a forced
    AVX2 run has its own, since isa() leaves out what it hides)."""
    digest = hashlib.sha1(f"{cpu_model()}|{isa()}".encode()).hexdigest()[:10]
    return digest


def machine_info() -> dict:
    return {"cpu": cpu_model(), "isa": isa(), "threads": _threads(), "cpus": os.cpu_count(),
            "key": machine_key()}


def _threads() -> int:
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:
        return os.cpu_count() or 1
