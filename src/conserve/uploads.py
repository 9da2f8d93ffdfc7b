"""A step's small inputs (token ids, positions, slots, block tables, sampling parameters) moved to the
device without a host sync.

`torch.tensor(values, device="cuda")` copies from pageable memory, which the host waits for; a step
made ~15 of them. Here a step's lists are packed into one host buffer and uploaded by one
non-blocking copy. On CUDA the host buffers are pinned and persistent: a ring, each buffer rewritten
only once the event recorded after its last upload has completed (it has, unless the host is a whole
ring of uploads ahead). On CPU the same call returns a fresh plain tensor: there the "upload" is the
buffer itself, and a suspended iteration may still hold the one of an earlier step.
"""

from __future__ import annotations

import numpy as np
import torch

_RING = 8
_MIN_CAPACITY = 4096


class Uploader:
    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._buffers: dict[torch.dtype, list[tuple[torch.Tensor, object | None]]] = {}
        self._turn: dict[torch.dtype, int] = {}

    def upload(self, parts: list[list[int]] | list[list[float]], dtype: torch.dtype = torch.int64) -> list[torch.Tensor]:
        """One device tensor per list, all from one copy."""
        sizes = [len(p) for p in parts]
        flat = [v for p in parts for v in p]
        if not self._cuda:
            return list(torch.tensor(flat, dtype=dtype).split(sizes))
        host = self._buffer(dtype, len(flat))
        host.numpy()[: len(flat)] = np.asarray(flat, dtype=host.numpy().dtype)
        out = host[: len(flat)].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        ring = self._buffers[dtype]
        ring[self._turn[dtype]] = (ring[self._turn[dtype]][0], event)
        return list(out.split(sizes))

    def one(self, values: list[int] | list[float], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return self.upload([values], dtype)[0]

    def _buffer(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        ring = self._buffers.setdefault(dtype, [])
        if len(ring) < _RING:
            ring.append((torch.empty(0, dtype=dtype), None))
        turn = self._turn[dtype] = (self._turn.get(dtype, -1) + 1) % len(ring)
        buffer, event = ring[turn]
        if event is not None:
            event.synchronize()  # its last upload must have left the buffer
        if buffer.numel() < n:
            buffer = torch.empty(max(n, 2 * buffer.numel(), _MIN_CAPACITY), dtype=dtype, pin_memory=True)
            ring[turn] = (buffer, None)
        return buffer
