"""AsyncEngine: the engine on its own thread, with an asyncio front for streaming.

The step loop runs on a dedicated thread (torch releases the GIL inside its kernels, so the event
loop keeps serving HTTP while the model computes). Requests cross over through a thread-safe inbox;
outputs come back once per step with a single call_soon_threadsafe, not one call per token.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from conserve.engine import Engine
from conserve.outputs import RequestOutput
from conserve.request import RequestClass
from conserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    request_class: RequestClass
    stream: asyncio.Queue
    arrival_time: float


class EngineDeadError(RuntimeError):
    """The engine thread stopped on an unexpected error; no request can be served."""


class AsyncEngine:
    """make_engine runs on the engine thread: the model is loaded, warmed up and run by one thread.
    (Measured: when one thread loads and warms up the model and another runs it, single-stream
    decode drops from ~65 to ~37 tok/s on a 2-core CPU, as each thread brings its own OpenMP team.)"""

    def __init__(self, make_engine: Callable[[], Engine],
                 on_step: Callable[[Engine, list[RequestOutput], float | None], None] | None = None):
        self._make_engine = make_engine
        self.engine: Engine | None = None
        self._ready = threading.Event()
        # Metrics hook, called on the engine thread after each step (with its duration) and after
        # requests were added or aborted (duration None).
        self._on_step = on_step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dead: BaseException | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the engine thread; block until it has built the engine (re-raising its error)."""
        self._thread = threading.Thread(target=self._run, name="conserve-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self.engine is None:
            raise self.dead if self.dead is not None else RuntimeError("the engine did not start")
        return self.engine

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop that receives outputs (set when the HTTP app starts)."""
        self._loop = loop

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    # -- requests ------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       request_class: RequestClass = RequestClass.ONLINE) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs as tokens appear; the last one has finished=True. Leaving the
        loop early (client gone, task cancelled) aborts the request and frees its KV blocks."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine stopped: {self.dead}")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._inbox.put(_Add(request_id, prompt_token_ids, params, request_class, stream, time.monotonic()))
        if request_class is RequestClass.ONLINE and self.engine is not None:
            self.engine.preemption.online_arrival(len(prompt_token_ids))  # may stop an offline iteration
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    # -- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._make_engine()
        except BaseException as e:  # e.g. ModelLoadError: reported by start()
            self.dead = e
            self._ready.set()
            return
        self._ready.set()
        engine = self.engine
        try:
            while not self._stopping:
                # Read before draining: an online arrival after this point may preempt the next
                # iteration if that iteration turns out to hold offline work only.
                seen = engine.preemption.arrivals
                if self._drain_inbox() and self._on_step is not None:
                    self._on_step(engine, [], None)  # requests came or went: refresh gauges
                if not engine.has_unfinished_requests():
                    engine.settle()
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                started = time.perf_counter()
                outputs = engine.step(seen)
                if self._on_step is not None:
                    self._on_step(engine, outputs, time.perf_counter() - started)
                if outputs:
                    self._deliver([(o.request_id, o) for o in outputs])
        except BaseException as e:  # a bug or OOM: fail every waiting client rather than hang them
            log.exception("engine thread died")
            self.dead = e
            error = EngineDeadError(f"the engine stopped: {e}")
            self._deliver([(rid, error) for rid in list(self._streams)])

    def _drain_inbox(self) -> bool:
        """Apply queued adds and aborts; True if there were any."""
        engine = self.engine
        drained = False
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return drained
            drained = True
            if isinstance(item, tuple):  # ("abort", id)
                engine.abort_request(item[1])
                continue
            try:
                engine.add_request(item.request_id, item.prompt_token_ids, item.params, item.request_class,
                                   item.arrival_time)
            except Exception as e:  # invalid request: hand the error to its caller only
                self._deliver([(item.request_id, e)])

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        def put() -> None:
            for request_id, item in items:
                stream = self._streams.get(request_id)
                if stream is not None:
                    stream.put_nowait(item)

        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(put)
