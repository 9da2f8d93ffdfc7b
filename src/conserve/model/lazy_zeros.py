"""Large zeroed CPU tensors whose pages the kernel supplies on first touch.

torch.zeros writes every byte up front: a KV cache sized from free memory (gigabytes) then costs
seconds at start-up and its full size in RSS even while mostly unused. An anonymous mmap is zero by
definition and committed page by page as blocks are first written, so a large cache costs what is
used. (glibc's calloc would do the same only for fresh mmaps, and malloc_tuning keeps buffers below
1 GiB in the heap.)
"""

from __future__ import annotations

import mmap

import torch


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    # The tensor's storage keeps the mmap object alive (frombuffer holds a reference to it).
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(shape)
