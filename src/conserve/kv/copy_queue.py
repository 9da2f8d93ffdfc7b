"""Where KV copies run: an ordered queue of device work beside the model's, with events.

`BlockCopier` issues every copy through one of these. An op is `run(fn, *tensors)`: fn calls torch on
exactly those tensors and captures none itself, so the queue knows every tensor the op touches. The
queue does not keep them alive: as on a GPU, where a queued kernel holds a raw pointer, the copier must
keep each tensor referenced until the event recorded after its ops has completed (the test queue checks
that it did).

- `CudaQueue`: a side stream. Ops run inside it; each CUDA tensor they touch is marked used by the
  stream (record_stream), so the caching allocator never hands its memory to the default stream
  while the op may still be queued, even if a reference is dropped early by mistake.
- `InlineQueue`: ops run when issued (CPU); every event has completed when recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch


class QueueEvent(Protocol):
    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class CopyQueue(Protocol):
    def after_compute(self) -> None:
        """Ops issued from now on run after the model work issued so far (it wrote what they read)."""

    def run(self, fn: Callable[..., object], *tensors: torch.Tensor) -> None: ...

    def wait(self, event: QueueEvent) -> None:
        """Ops issued from now on run after `event` (on the device: the host does not block)."""

    def record(self) -> QueueEvent: ...

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, pinned_host: bool = False) -> torch.Tensor:
        """A buffer for ops of this queue: on its device, or (pinned_host) in host memory it can copy
        to and from asynchronously."""


class _Done:
    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class InlineQueue:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def after_compute(self) -> None:
        pass

    def run(self, fn: Callable[..., object], *tensors: torch.Tensor) -> None:
        fn(*tensors)

    def wait(self, event: QueueEvent) -> None:
        pass

    def record(self) -> QueueEvent:
        return _Done()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, pinned_host: bool = False) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="cpu" if pinned_host else self.device)


class CudaQueue:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def after_compute(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def run(self, fn: Callable[..., object], *tensors: torch.Tensor) -> None:
        with torch.cuda.stream(self.stream):
            fn(*tensors)
        for t in tensors:
            if t.is_cuda:
                t.record_stream(self.stream)

    def wait(self, event: QueueEvent) -> None:
        self.stream.wait_event(event)

    def record(self) -> QueueEvent:
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, pinned_host: bool = False) -> torch.Tensor:
        if pinned_host:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        with torch.cuda.stream(self.stream):  # allocated for the stream that uses it
            return torch.empty(shape, dtype=dtype, device=self.device)


def queue_for(device: torch.device) -> CopyQueue:
    return CudaQueue(device) if device.type == "cuda" else InlineQueue(device)
