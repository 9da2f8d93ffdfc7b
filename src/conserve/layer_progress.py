"""How far the device has got through an iteration's layers: safepoints decided in device time.

On a GPU the host enqueues layer after layer long before the device runs them, so a stop decided
after the host enqueued layer i still leaves every enqueued layer to run, and the host's pace says
nothing about the device's. In a preemptible iteration the runner therefore records an event after
each layer and keeps the host at most `lookahead` layers ahead of the device (before deciding at
layer i it waits for the event of layer i - lookahead): a stop then costs at most lookahead + 1
layers of device time after the arrival is seen, and `layers_done` reads the device's progress.

On CPU the same code runs with host events: a layer is done when the host returns from it, nothing
ever waits. lookahead 0 switches it off: no events, no waits (host time, as before).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # torch only where a CUDA event is made: the CLI and config import this module
    import torch


class LayerEvent(Protocol):
    def record(self) -> None: ...

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class HostEvent:
    """The CPU's event: the work before it is done once the host has issued it."""

    def record(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


def event_factory(device: torch.device):
    if device.type == "cuda":
        import torch

        return torch.cuda.Event
    return HostEvent


class LayerProgress:
    def __init__(self, new_event, lookahead: int = 1) -> None:
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        self._new_event = new_event
        self.lookahead = lookahead
        self._events: list[LayerEvent] = []
        self._done = 0  # leading events known complete
        self._issued = 0

    def begin(self) -> None:
        """A preemptible run of layers starts."""
        self._events.clear()
        self._done = self._issued = 0

    def layer_issued(self) -> None:
        """The host has issued one more layer: mark it, and wait until the device is at most
        `lookahead` layers behind."""
        self._issued += 1
        if not self.lookahead:
            return
        event = self._new_event()
        event.record()
        self._events.append(event)
        behind = len(self._events) - 1 - self.lookahead
        if behind >= self._done:
            self._events[behind].synchronize()
            self._done = behind + 1

    def layers_done(self) -> int:
        """Layers of this run the device has finished (with lookahead 0: those the host issued)."""
        if not self.lookahead:
            return self._issued
        while self._done < len(self._events) and self._events[self._done].query():
            self._done += 1
        return self._done

    def finish(self) -> None:
        """Wait for every issued layer (a stop's work is over when the device is)."""
        if self._events:
            self._events[-1].synchronize()
            self._done = len(self._events)
