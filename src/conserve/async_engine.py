"""AsyncEngine: the engine on its own thread, with an asyncio front for streaming, and a supervisor
that rebuilds the engine when a step fails.

The step loop runs on a dedicated thread (torch releases the GIL inside its kernels, so the event
loop keeps serving HTTP while the model computes). Requests cross over through a thread-safe inbox;
outputs come back once per step with a single call_soon_threadsafe, not one call per token, and as
deltas (conserve.deltas): each stream holds at most one pending output however slow its reader.

Faults: an exception from a step fails every request in flight (EngineRestartingError, a kind of
EngineDeadError), then the same thread rebuilds the engine with make_engine after a backoff that
doubles with each consecutive failure (capped). A restart counts as failed when the rebuild raises or
the rebuilt engine faults before completing a step; after max_restarts consecutive failed restarts
the supervisor gives up and the engine stays dead.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from conserve.deltas import DeltaBuffer, DeltaTracker
from conserve.engine import Engine, PromptLimits
from conserve.errors import EngineUnavailable
from conserve.outputs import RequestOutput
from conserve.request import RequestClass
from conserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)

STARTING, RUNNING, RESTARTING, DEAD = "starting", "running", "restarting", "dead"
MAX_BACKOFF_S = 60.0


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    request_class: RequestClass
    arrival_time: float
    deadline: float | None = None


class EngineDeadError(EngineUnavailable):
    """The engine stopped on an unexpected error; this request cannot be served."""


class EngineRestartingError(EngineDeadError):
    """The engine failed and is being rebuilt: try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def restart_delay(failures: int, base_s: float, cap_s: float = MAX_BACKOFF_S) -> float:
    """Backoff before restart number `failures` of a run of consecutive failures (1, 2, ...)."""
    return min(cap_s, base_s * 2 ** (failures - 1))


class AsyncEngine:
    """make_engine runs on the engine thread: the model is loaded, warmed up and run by one thread.
    (Measured: when one thread loads and warms up the model and another runs it, single-stream
    decode drops from ~65 to ~37 tok/s on a 2-core CPU, as each thread brings its own OpenMP team.)

    max_restarts: consecutive failed restarts before giving up (0: a fault kills the engine for good).
    restart_backoff_s: the wait before the first restart; it doubles per consecutive failure."""

    def __init__(self, make_engine: Callable[[], Engine],
                 on_step: Callable[[Engine, list[RequestOutput], float | None], None] | None = None,
                 max_restarts: int = 5, restart_backoff_s: float = 1.0, max_backoff_s: float = MAX_BACKOFF_S):
        if max_restarts < 0 or restart_backoff_s < 0:
            raise ValueError("max_restarts and restart_backoff_s must be >= 0")
        self._make_engine = make_engine
        self.max_restarts, self.restart_backoff_s, self.max_backoff_s = max_restarts, restart_backoff_s, max_backoff_s
        self.engine: Engine | None = None  # None while a failed engine is rebuilt
        self.prompt_limits: PromptLimits | None = None  # from the first engine; the same for every rebuild
        self._ready = threading.Event()
        # Metrics hook, called on the engine thread after each step (with its duration) and after
        # requests were added or aborted (duration None).
        self._on_step = on_step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        # Guards state changes against generate(): a request is either failed by a fault or reaches
        # the engine that follows it, never lost in between.
        self._lock = threading.Lock()
        self._streams: dict[str, DeltaBuffer] = {}
        self._deltas = DeltaTracker()  # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.state = STARTING
        self.dead: BaseException | None = None  # why the engine stopped for good
        self.restarts = 0  # successful rebuilds since start
        self._restart_at = 0.0  # monotonic time of the next rebuild attempt
        self._build_s = 0.0  # how long the last build took

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
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.state == RUNNING

    def retry_after(self) -> float:
        """Seconds until the engine is expected back (restarting), for Retry-After headers."""
        return max(0.0, self._restart_at - time.monotonic()) + self._build_s

    def check_serving(self) -> None:
        """Raise EngineRestartingError / EngineDeadError unless the engine takes requests now."""
        if self.state == RESTARTING:
            raise EngineRestartingError("the engine failed and is restarting", self.retry_after())
        if self.state == DEAD:
            raise EngineDeadError(f"the engine stopped: {self.dead}")

    # -- requests ------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       request_class: RequestClass = RequestClass.ONLINE,
                       deadline: float | None = None) -> AsyncIterator[RequestOutput]:
        """Yield outputs as tokens appear, each holding only what is new since the previous one (text,
        token ids, logprobs; conserve.deltas.Accumulator rebuilds the whole); the last has finished=True.
        Leaving the loop early (client gone, task cancelled) aborts the request and frees its KV blocks.
        Raises EngineDeadError (EngineRestartingError while a rebuild is pending) when the engine
        cannot serve it or fails while it runs. deadline: see Request.deadline (offline work)."""
        stream = DeltaBuffer()
        with self._lock:
            self.check_serving()
            self._streams[request_id] = stream
            self._inbox.put(_Add(request_id, prompt_token_ids, params, request_class, time.monotonic(), deadline))
        engine = self.engine
        if request_class is RequestClass.ONLINE and engine is not None:
            engine.preemption.online_arrival(len(prompt_token_ids))  # may stop an offline iteration
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.get()
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
            engine = self._build()
        except BaseException as e:  # e.g. ModelLoadError: reported by start()
            self.dead, self.state = e, DEAD
            self._ready.set()
            return
        self.state = RUNNING
        self._ready.set()
        failures = 0
        while True:
            stepped, error = self._serve(engine)
            engine = None
            if error is None:  # shutdown
                return
            failures = 1 if stepped else failures + 1
            engine = self._recover(error, failures)
            if engine is None:
                return

    def _build(self) -> Engine:
        started = time.monotonic()
        engine = self._make_engine()
        self._build_s = time.monotonic() - started
        if self.prompt_limits is None:
            self.prompt_limits = engine.prompt_limits
        self.engine = engine
        return engine

    def _serve(self, engine: Engine) -> tuple[bool, BaseException | None]:
        """Run steps until shutdown (-> error None) or a fault (-> the error); `stepped` says whether a
        step completed, which makes the restart that built this engine a successful one."""
        stepped = False
        try:
            while not self._stop.is_set():
                # Read before draining: an online arrival after this point may preempt the next
                # iteration if that iteration turns out to hold offline work only.
                seen = engine.preemption.arrivals
                if self._drain_inbox(engine) and self._on_step is not None:
                    self._on_step(engine, [], None)  # requests came or went: refresh gauges
                if not engine.has_unfinished_requests():
                    if engine.settle() and self._on_step is not None:
                        self._on_step(engine, [], None)  # blocks held by copies were freed
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                started = time.perf_counter()
                outputs = engine.step(seen)
                stepped = True
                if self._on_step is not None:
                    self._on_step(engine, outputs, time.perf_counter() - started)
                if outputs:
                    self._deliver([(o.request_id, self._deltas.delta(o)) for o in outputs])
        except Exception as e:  # a bug, OOM, a device error: fail its requests, then rebuild
            return stepped, e
        return stepped, None

    def _recover(self, error: BaseException, failures: int) -> Engine | None:
        """After a fault: fail the requests in flight, free the old engine, back off and rebuild
        (again while rebuilds fail). None when giving up or shutting down."""
        if failures == 1:  # the first fault of a run: its traceback once, then one line per restart
            log.error("engine step failed", exc_info=error)
        while True:
            give_up = failures > self.max_restarts
            delay = restart_delay(failures, self.restart_backoff_s, self.max_backoff_s)
            self._restart_at = time.monotonic() + delay
            self._fail_in_flight(error, give_up)
            self.engine = None
            error.__traceback__ = None  # its frames hold the old engine
            gc.collect()
            _empty_device_cache()
            if give_up:
                log.error("engine failed %d times in a row (last error: %r); not restarting again "
                          "(--max-engine-restarts %d): the server answers 503 until it is restarted",
                          failures, error, self.max_restarts)
                return None
            log.error("engine failed (%r): restart %d of at most %d in a row in %.2f s", error, failures,
                      self.max_restarts, delay)
            if self._stop.wait(delay):
                return None
            try:
                engine = self._build()
            except Exception as e:  # the rebuild itself failed: back off longer
                log.error("engine rebuild failed: %r", e)
                error, failures = e, failures + 1
                continue
            self.restarts += 1
            self.state = RUNNING
            log.warning("engine restarted (%d restarts since start)", self.restarts)
            return engine

    def _fail_in_flight(self, error: BaseException, dead: bool) -> None:
        with self._lock:
            if dead:
                self.dead, self.state = error, DEAD
                failure = EngineDeadError(f"the engine stopped: {error!r}")
            else:
                self.state = RESTARTING
                failure = EngineRestartingError(f"the engine failed and is restarting: {error!r}",
                                                self.retry_after())
            ids = list(self._streams)
            while True:  # requests not yet added die with the engine too; aborts are moot
                try:
                    self._inbox.get_nowait()
                except queue.Empty:
                    break
        self._deltas.clear()
        self._deliver([(rid, failure) for rid in ids])

    def _drain_inbox(self, engine: Engine) -> bool:
        """Apply queued adds and aborts; True if there were any."""
        drained = False
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return drained
            drained = True
            if isinstance(item, tuple):  # ("abort", id)
                engine.abort_request(item[1])
                self._deltas.forget(item[1])
                continue
            try:
                engine.add_request(item.request_id, item.prompt_token_ids, item.params, item.request_class,
                                   item.arrival_time, item.deadline)
            except Exception as e:  # invalid request: hand the error to its caller only
                self._deliver([(item.request_id, e)])

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        def put() -> None:
            for request_id, item in items:
                stream = self._streams.get(request_id)
                if stream is None:
                    continue
                if isinstance(item, BaseException):
                    stream.fail(item)
                else:
                    stream.push(item)

        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(put)
            except RuntimeError:  # the loop closed meanwhile (shutdown)
                pass


def _empty_device_cache() -> None:
    """Return the failed engine's device memory before the rebuild allocates it again."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
