"""A fake device queue for the block copier's tests: it runs nothing until told, then runs jobs late
and in any order, and it holds only weak references to the tensors its ops touch, as a GPU holds raw
pointers. A tensor the copier let go of before its job's event completed is a use after free here
(an error), where on a GPU the caching allocator would have handed its memory to the next step.
"""

from __future__ import annotations

import random
import weakref

import torch


class UseAfterFree(AssertionError):
    pass


class LateEvent:
    def __init__(self, queue: LateQueue, unit: list) -> None:
        self.queue, self.unit, self.ran = queue, unit, False

    def query(self) -> bool:
        return self.ran

    def synchronize(self) -> None:
        self.queue.complete(self)


class LateQueue:
    def __init__(self) -> None:
        self._unit: list = []  # ops issued since the last event: one job's work
        self.events: list[LateEvent] = []  # recorded, not yet run

    # -- the CopyQueue interface ---------------------------------------------------------------
    def after_compute(self) -> None:
        pass  # the fake "model" has finished everything by the time a copy is issued

    def run(self, fn, *tensors: torch.Tensor) -> None:
        captured = [c.cell_contents for c in (fn.__closure__ or ())] + list(fn.__defaults__ or ())
        assert not any(isinstance(c, torch.Tensor) for c in captured), "an op captured a tensor the queue cannot see"
        self._unit.append(("op", fn, [weakref.ref(t) for t in tensors]))

    def wait(self, event: LateEvent) -> None:
        self._unit.append(("wait", event))

    def record(self) -> LateEvent:
        event = LateEvent(self, self._unit)
        self._unit = []
        self.events.append(event)
        return event

    def empty(self, shape, dtype, pinned_host: bool = False) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=dtype) if dtype.is_floating_point else torch.empty(shape, dtype=dtype)

    # -- the test's controls -------------------------------------------------------------------
    def complete(self, event: LateEvent) -> None:
        """Run one job's ops now (after the events it waits for)."""
        if event.ran:
            return
        for entry in event.unit:
            if entry[0] == "wait":
                self.complete(entry[1])
                continue
            _, fn, refs = entry
            tensors = [r() for r in refs]
            if any(t is None for t in tensors):
                raise UseAfterFree("a queued op's tensor was freed before its event completed")
            fn(*tensors)
        event.ran = True
        self.events.remove(event)

    def complete_all(self, rng: random.Random | None = None) -> None:
        """Run every recorded job, in a random order when rng is given."""
        pending = list(self.events)
        if rng is not None:
            rng.shuffle(pending)
        for event in pending:
            self.complete(event)
