"""The batch runner: validates, executes and finalizes OpenAI batch jobs, durably.

Statuses (OpenAI's):
    validating -> in_progress -> finalizing -> completed
    validating -> failed                                 the input file is unusable as a whole
    validating | in_progress -> cancelling -> cancelled  POST /v1/batches/{id}/cancel
    validating | in_progress -> expired                  completion_window passed

Input lines. Every non-blank line must be a JSON object
{"custom_id": "<non-empty string>", "method": "POST", "url": <the batch's endpoint>, "body": {...}}.
- A broken line (bad JSON, a missing or invalid field, another url) does not stop the batch: it goes to
  the error file and counts as failed; the other lines run. Its error line is
  {"id": "batch_req_...", "custom_id": <or null>, "response": null, "error": {"code", "message"}},
  the message starting with "line N:".
- Duplicate custom_ids fail the whole batch during validation, before anything runs (OpenAI does the
  same): results are matched to requests by custom_id, so running duplicates would make them
  ambiguous. `errors.data` lists each duplicate with both line numbers: "line 7: custom_id 'a' was
  already used on line 3; custom_ids must be unique within a batch".
- An empty input (no non-blank lines) or a deleted input file also fails the batch.
- Blank lines are skipped and not counted.

Results, in input order, as OpenAI writes them:
{"id": "batch_req_...", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}.
2xx answers go to the output file, other answers (4xx for a bad body) to the error file. Lines the
window cut off go to the error file with error code "batch_expired"; lines a cancel cut off are in
neither file. Both files have purpose "batch_output"; an empty one is not created and its id is null.

Deadlines. A batch's deadline is created_at + completion_window ("24h" as OpenAI; this server also
takes minutes, hours or days: "30m", "2h", "3d"). With deadlines on (the default), lines get engine slots
earliest deadline first and carry the deadline into the engine, whose scheduler serves offline work
earliest deadline first; off, arrival order. Each batch is costed in tokens when it is created, and
its progress and estimated completion (batch_estimate.py) are reported in its `metadata` under
conserve_* keys while it runs. A batch that cannot meet its window still runs: it expires, as OpenAI's
do, only once the window has passed.

Durability. A finished line is committed, with request_counts, before anything counts it; lines that
finish together share one commit (one fsync). `start()` resumes every unfinished batch: committed lines
are kept and not executed again, the rest run.

Faults. A line in flight when the engine fails is run again once the engine is back, not committed as
failed; a line that keeps failing the engine is committed as failed after a few tries (batch_retry.py).
An internal error in a batch's driver (a store write failing, a bug) keeps the batch's status and its
committed lines and drives it again after a back-off; no error path deletes committed lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from conserve.server.batch_estimate import BatchWork, completion_times, rough_cost, window_seconds
from conserve.server.batch_retry import EngineRetry
from conserve.server.batch_slots import PrioritySlots
from conserve.server.errors import APIError, error_body
from conserve.server.store import Batch, LineResult, PendingFile, Store, new_id

log = logging.getLogger(__name__)

# Runs one line's body (endpoint, body, deadline) as a non-streaming, offline POST to the endpoint;
# returns (status, json body), or raises EngineDeadError when the engine failed under it (see
# batch_retry.py). deadline: the batch's expires_at (unix seconds), or None with deadlines off.
Execute = Callable[[str, dict, "float | None"], Awaitable[tuple[int, dict]]]
# A line's (prompt tokens, most output tokens), for the batch's estimate.
Cost = Callable[[str, dict], tuple[int, int]]

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
META_PREFIX = "conserve_"  # metadata keys this server adds to a running batch
MAX_METADATA = 16  # OpenAI's limit of metadata pairs; the server's keys only fill what users leave
MAX_BATCH_ERRORS = 100  # errors.data entries kept for a failed batch; the last one summarizes the rest
MAX_DRIVER_DELAY_S = 60.0  # the longest back-off before driving a batch again after an internal error
_BOM = b"\xef\xbb\xbf"


class _InputGone(Exception):
    """The input file was deleted while the batch ran: its remaining lines cannot be read."""


class _BadLine(Exception):
    def __init__(self, code: str, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.custom_id = code, message, custom_id


@dataclass
class _Validation:
    total: int = 0
    line_errors: list[LineResult] = field(default_factory=list)
    batch_errors: list[dict] = field(default_factory=list)


@dataclass
class _Job:
    batch_id: str
    task: asyncio.Task | None = None
    lines: set[asyncio.Task] = field(default_factory=set)
    stop: str | None = None  # "cancel" or "expire": start no more lines, cut the running ones off
    stopped: asyncio.Event = field(default_factory=asyncio.Event)  # set with `stop`: ends a back-off early
    timer: asyncio.TimerHandle | None = None
    expires_at: float = math.inf
    order: tuple = ()  # place in the offline queue: (deadline, arrival) or (arrival,)
    work: BatchWork | None = None  # costed lines (None until costed)


class BatchRunner:
    """Runs batches against `execute`, at most `max_concurrency` lines at once over all batches (enough
    to keep the engine's offline queue full). `window_s` overrides the 24h completion window (tests).
    `retry` handles engine faults (default: EngineRetry(), which assumes the engine is always ready);
    `driver_delay_s` is the first back-off after an internal error in a batch's driver.
    `deadlines`: serve batches earliest deadline first (else in arrival order). `cost` prices a line in
    tokens (default: rough_cost, no tokenizer); `harvest_rate` gives the offline tokens/s to expect
    (None: no estimate)."""

    def __init__(self, store: Store, execute: Execute, max_concurrency: int = 64,
                 window_s: float | None = None, retry: EngineRetry | None = None,
                 driver_delay_s: float = 1.0, deadlines: bool = True, cost: Cost | None = None,
                 harvest_rate: Callable[[], float | None] | None = None) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.store = store
        self._execute = execute
        self._window_s = window_s
        self._retry = retry if retry is not None else EngineRetry()
        self._driver_delay_s = driver_delay_s
        self.deadlines = deadlines
        self._cost = cost if cost is not None else rough_cost
        self._harvest_rate = harvest_rate
        self._arrivals = 0
        self._max_concurrency = max_concurrency
        self._slots = PrioritySlots(max_concurrency)
        self._committer = _GroupCommitter(store)
        self._jobs: dict[str, _Job] = {}
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Resume every batch the last server left unfinished (call once the event loop runs)."""
        self._committer.start()
        for batch in self.store.unfinished_batches():
            log.info("resuming batch %s (%s)", batch.id, batch.status)
            self._spawn(batch)

    async def shutdown(self) -> None:
        """Stop all work without changing any status: the next start() resumes it."""
        self._closed = True
        jobs = list(self._jobs.values())
        for job in jobs:
            if job.timer is not None:
                job.timer.cancel()
            if job.task is not None:
                job.task.cancel()
        await asyncio.gather(*(j.task for j in jobs if j.task is not None), return_exceptions=True)
        await self._committer.close()

    # -- API operations ----------------------------------------------------------------------------
    async def create(self, input_file_id: str, endpoint: str, completion_window: str = "24h",
                     metadata: dict[str, str] | None = None) -> Batch:
        if not isinstance(endpoint, str) or endpoint not in ENDPOINTS:
            raise APIError(400, f"endpoint must be one of {', '.join(ENDPOINTS)}; got {endpoint!r}", "endpoint")
        window = window_seconds(completion_window)
        if window is None:
            raise APIError(400, "completion_window must be '24h', or a number of minutes, hours or days from "
                           f"1m to 7d such as '30m' or '2h'; got {completion_window!r}", "completion_window")
        _check_metadata(metadata)
        if not isinstance(input_file_id, str):
            raise APIError(400, "input_file_id must be a string", "input_file_id")
        file = self.store.get_file(input_file_id)
        if file is None:
            raise APIError(404, f"No such file: {input_file_id}", "input_file_id", "file_not_found")
        if file.purpose != "batch":
            raise APIError(400, f"file {input_file_id} has purpose {file.purpose!r}; a batch input file must "
                           "be uploaded with purpose 'batch'", "input_file_id")
        if self._closed:
            raise APIError(503, "the server is shutting down")
        work = await asyncio.to_thread(self._cost_lines, input_file_id, endpoint, set())
        now = int(time.time())
        window = self._window_s if self._window_s is not None else window
        batch = Batch(id=new_id("batch_"), endpoint=endpoint, input_file_id=input_file_id,
                      completion_window=completion_window, status="validating", created_at=now,
                      expires_at=now + math.ceil(window), metadata=metadata)
        await asyncio.to_thread(self.store.create_batch, batch)
        self._spawn(batch, work)
        return batch

    async def cancel(self, batch_id: str) -> Batch:
        batch = self.store.get_batch(batch_id)
        if batch is None:
            raise APIError(404, f"No such batch: {batch_id}", "batch_id", "batch_not_found")
        if batch.status == "cancelling":
            return batch
        # Persist "cancelling" first: a crash right after this reply still ends in "cancelled".
        batch = await asyncio.to_thread(self.store.update_batch, batch_id, if_status=("validating", "in_progress"),
                                        status="cancelling", cancelling_at=int(time.time()))
        if batch.status != "cancelling":
            raise APIError(409, f"batch {batch_id} is {batch.status} and can no longer be cancelled",
                           code="batch_not_cancellable")
        job = self._jobs.get(batch_id)
        if job is not None:
            self._stop(job, "cancel")
        elif not self._closed:
            self._spawn(batch)  # not running (only before start()): finalize it as cancelled
        return batch

    # -- progress and estimates --------------------------------------------------------------------
    def to_api(self, batch: Batch) -> dict:
        """The batch's API object; while it runs, its metadata also holds the server's conserve_* keys
        (as many as fit beside the user's, up to 16 pairs): conserve_progress (the share of its token
        work done, 0 to 1), conserve_estimated_completion_at (unix seconds, once a harvest rate is
        known) and conserve_meets_window ("true"/"false": the estimate is within expires_at)."""
        doc = batch.to_api()
        live = self.live_status().get(batch.id)
        if live is None or batch.status not in ("validating", "in_progress"):
            return doc
        extra = {"progress": f"{live['progress']:.3f}"}
        if live["estimated_completion_at"] is not None:
            extra["estimated_completion_at"] = str(math.ceil(live["estimated_completion_at"]))
            extra["meets_window"] = "true" if live["meets_window"] else "false"
        metadata = dict(doc["metadata"] or {})
        for key, value in extra.items():
            if len(metadata) >= MAX_METADATA:
                break
            metadata.setdefault(META_PREFIX + key, value)
        return {**doc, "metadata": metadata}

    def live_status(self) -> dict[str, dict]:
        """{batch id: {"progress", "estimated_completion_at", "meets_window"}} of the batches running
        here (the last two None without a harvest rate), estimated together: each waits for the ones
        the scheduler serves before it."""
        jobs = sorted((j for j in self._jobs.values() if j.work is not None and j.stop is None),
                      key=lambda j: j.order)
        rate = self._harvest_rate() if self._harvest_rate is not None else None
        done_at = completion_times([j.work.remaining_tokens for j in jobs], rate, time.time())
        return {job.batch_id: {"progress": job.work.progress, "estimated_completion_at": at,
                               "meets_window": None if at is None else at <= job.expires_at}
                for job, at in zip(jobs, done_at)}

    def summaries(self, limit: int = 20) -> list[dict]:
        """The newest batches, for the dashboard: counts, times and, while running, progress and the
        estimate (live_status)."""
        live = self.live_status()
        out = []
        for b in self.store.list_batches(limit)[0]:
            finished = b.completed_at or b.expired_at or b.cancelled_at or b.failed_at
            row = {"id": b.id, "status": b.status, "completion_window": b.completion_window,
                   "created_at": b.created_at, "expires_at": b.expires_at, "finished_at": finished,
                   "total": b.total, "completed": b.completed, "failed": b.failed,
                   "progress": 1.0 if finished else None, "estimated_completion_at": None, "meets_window": None}
            row.update(live.get(b.id, {}))
            out.append(row)
        return out

    def _cost_lines(self, file_id: str, endpoint: str, done: set[int]) -> BatchWork:
        """Price every well-formed line of the input file (blocking: call from a worker thread)."""
        work = BatchWork()
        try:
            f = open(self.store.file_path(file_id), "rb")
        except FileNotFoundError:
            return work
        with f:
            for line_no, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    body = parse_line(raw, endpoint)[1]
                    prompt, max_out = self._cost(endpoint, body)
                except Exception:  # a broken line costs nothing: it fails in validation
                    continue
                work.add_line(line_no, prompt, max_out, finished=line_no in done)
        return work

    # -- one batch ---------------------------------------------------------------------------------
    def _spawn(self, batch: Batch, work: BatchWork | None = None) -> None:
        job = _Job(batch.id, work=work, expires_at=batch.expires_at)
        self._arrivals += 1
        job.order = (batch.expires_at, self._arrivals) if self.deadlines else (self._arrivals,)
        self._jobs[batch.id] = job
        if batch.status in ("validating", "in_progress"):
            delay = batch.expires_at - time.time()
            if delay <= 0:
                job.stop = "expire"
            else:
                job.timer = asyncio.get_running_loop().call_later(delay, self._stop, job, "expire")
        job.task = asyncio.create_task(self._drive(job), name=f"batch {batch.id}")

    def _stop(self, job: _Job, reason: str) -> None:
        if job.stop is None:
            job.stop = reason
            job.stopped.set()
            for task in list(job.lines):
                task.cancel()

    async def _drive(self, job: _Job) -> None:
        """Drive the batch to its end. An internal error leaves the batch as it is (status and committed
        lines) and drives it again after a back-off: every step is safe to repeat."""
        errors = 0
        try:
            while True:
                try:
                    await self._drive_once(job)
                    return
                except asyncio.CancelledError:
                    raise
                except _InputGone as e:
                    await self._fail_keeping_results(job.batch_id, e)
                    return
                except Exception:
                    errors += 1
                    delay = min(self._driver_delay_s * 2 ** (errors - 1), MAX_DRIVER_DELAY_S)
                    log.exception("batch %s: internal error; its committed lines are kept and it runs again "
                                  "in %.1f s", job.batch_id, delay)
                    with contextlib.suppress(asyncio.TimeoutError):  # a cancel or expiry cuts the wait short
                        await asyncio.wait_for(job.stopped.wait(), delay)
        finally:
            if job.timer is not None:
                job.timer.cancel()
            if self._jobs.get(job.batch_id) is job:
                del self._jobs[job.batch_id]

    async def _drive_once(self, job: _Job) -> None:
        batch = self._batch(job.batch_id)
        if job.work is None and batch.status in ("validating", "in_progress"):  # resumed after a restart
            job.work = await asyncio.to_thread(self._cost_lines, batch.input_file_id, batch.endpoint,
                                               self.store.finished_lines(batch.id))
        if batch.status == "validating":
            batch = await self._validate(batch)
        if batch.status == "in_progress" and job.stop is None:
            await self._run_lines(job, batch)
        if batch.status != "failed":
            await self._committer.flush()  # lines cut off mid-commit are in before the files are written
            await self._finalize(job)

    async def _fail_keeping_results(self, batch_id: str, e: _InputGone) -> None:
        """The batch cannot go on: fail it, with the lines it finished in its output and error files."""
        log.error("batch %s failed: %s", batch_id, e)
        await self._committer.flush()
        await asyncio.to_thread(self._write_results, batch_id, "failed", "failed_at",
                                errors=[_batch_error("file_not_found", str(e), "input_file_id")])

    def _batch(self, batch_id: str) -> Batch:
        batch = self.store.get_batch(batch_id)
        if batch is None:
            raise KeyError(batch_id)
        return batch

    async def _validate(self, batch: Batch) -> Batch:
        path = self.store.file_path(batch.input_file_id)
        try:
            found = await asyncio.to_thread(_validate_file, path, batch.id, batch.endpoint)
        except FileNotFoundError:
            found = _Validation(batch_errors=[_batch_error(
                "file_not_found", f"the input file {batch.input_file_id} was deleted", "input_file_id")])
        now = int(time.time())
        if found.batch_errors or found.total == 0:
            errors = found.batch_errors or [_batch_error("empty_file", "the input file has no request lines",
                                                         "input_file_id")]
            return await asyncio.to_thread(self.store.update_batch, batch.id, if_status=("validating",),
                                           status="failed", failed_at=now, errors=errors)
        # Broken lines are finished lines: commit them with the total, then move on (a crash in between
        # re-validates, and re-adding a line is a no-op). A cancel meanwhile keeps "cancelling".
        await asyncio.to_thread(self.store.update_batch, batch.id, results=found.line_errors, total=found.total)
        return await asyncio.to_thread(self.store.update_batch, batch.id, if_status=("validating",),
                                       status="in_progress", in_progress_at=now)

    async def _run_lines(self, job: _Job, batch: Batch) -> None:
        done = self.store.finished_lines(batch.id)
        try:
            f = open(self.store.file_path(batch.input_file_id), "rb")
        except FileNotFoundError:
            raise _InputGone(f"the input file {batch.input_file_id} was deleted before the batch finished") from None
        # A line whose commit failed: kept here, as its task may be long gone from job.lines when
        # the loop ends, and its line must not go missing from a "completed" batch.
        errors: list[BaseException] = []

        def line_ended(task: asyncio.Task) -> None:
            job.lines.discard(task)
            if not task.cancelled() and task.exception() is not None:
                errors.append(task.exception())

        # Every line waits for an engine slot in its own task, so each batch keeps a full set of lines
        # in the slots' queue besides those running: a freed slot goes to the nearest deadline even
        # while that batch's driver is busy. The backlog bounds the tasks a batch has at once.
        backlog = asyncio.Semaphore(2 * self._max_concurrency)
        try:
            with f:
                for line_no, raw in enumerate(f, 1):
                    if job.stop is not None or errors:
                        break
                    if line_no in done or not raw.strip():
                        continue
                    await backlog.acquire()
                    if job.stop is not None or errors:
                        backlog.release()
                        break
                    task = asyncio.create_task(self._slotted_line(job, batch, line_no, raw))
                    # Released when the task ends, however it ends: a task cancelled before its first
                    # step never runs its own finally blocks, and would keep its place for good.
                    task.add_done_callback(lambda _: backlog.release())
                    task.add_done_callback(line_ended)
                    job.lines.add(task)
            await asyncio.gather(*job.lines, return_exceptions=True)
        except BaseException:  # shutdown: cut the running lines off; they resume on the next start
            for task in job.lines:
                task.cancel()
            await asyncio.gather(*job.lines, return_exceptions=True)
            raise
        if errors:  # a commit failed: the batch cannot be trusted to finish (the driver runs it again)
            raise errors[0]

    async def _slotted_line(self, job: _Job, batch: Batch, line_no: int, raw: bytes) -> None:
        await self._slots.acquire((*job.order, line_no))  # earliest deadline first (or arrival order)
        try:
            await self._run_line(job, batch, line_no, raw)
        finally:
            self._slots.release()

    async def _run_line(self, job: _Job, batch: Batch, line_no: int, raw: bytes) -> None:
        deadline = float(batch.expires_at) if self.deadlines else None
        usage = None
        try:
            custom_id, body = parse_line(raw, batch.endpoint)  # parsed again: memory stays flat
        except _BadLine as e:
            row = LineResult(batch.id, line_no, False, _error_doc(e.custom_id, e.code, f"line {line_no}: {e}"))
        else:
            try:
                status, answer = await self._retry.run(lambda: self._execute(batch.endpoint, body, deadline),
                                                       f"batch {batch.id} line {line_no}")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug behind execute: fail this line, keep the batch going
                log.exception("batch %s line %d", batch.id, line_no)
                status, answer = 500, error_body(500, f"internal error: {type(e).__name__}")
            row = LineResult(batch.id, line_no, 200 <= status < 300, _response_doc(custom_id, status, answer))
            if row.ok and isinstance(answer.get("usage"), dict):
                usage = answer["usage"]
        if job.work is not None:
            job.work.finish_line(line_no, usage)
        # Shielded: a line that finished is committed even if a cancel arrives meanwhile.
        await asyncio.shield(self._committer.put(row))

    async def _finalize(self, job: _Job) -> None:
        batch = self._batch(job.batch_id)
        final = stamp = None
        if batch.status == "cancelling" or job.stop == "cancel":
            final, stamp = "cancelled", "cancelled_at"
        elif job.stop == "expire" and batch.status != "finalizing":
            done = self.store.finished_lines(batch.id)
            late = await asyncio.to_thread(_expired_lines, self.store.file_path(batch.input_file_id), batch, done)
            if late is None or late:
                await asyncio.to_thread(self.store.update_batch, batch.id, results=late or ())
                final, stamp = "expired", "expired_at"
        if final is None:
            batch = await asyncio.to_thread(self.store.update_batch, batch.id, if_status=("in_progress",),
                                            status="finalizing", finalizing_at=int(time.time()))
            final, stamp = (("cancelled", "cancelled_at") if batch.status == "cancelling"
                            else ("completed", "completed_at"))
        await asyncio.to_thread(self._write_results, batch.id, final, stamp)

    def _write_results(self, batch_id: str, status: str, stamp: str, **changes) -> Batch:
        """Write the output and error files, then register them and the final status in one commit."""
        files: list[tuple[PendingFile, str]] = []
        ids: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        try:
            for ok, key, suffix in ((True, "output_file_id", "output"), (False, "error_file_id", "error")):
                pending: PendingFile | None = None
                for doc in self.store.result_docs(batch_id, ok):
                    if pending is None:
                        pending = self.store.new_file()
                        files.append((pending, f"{batch_id}_{suffix}.jsonl"))
                    pending.write(doc.encode() + b"\n")
                if pending is not None:
                    pending.seal()
                    ids[key] = pending.id
            return self.store.finish_batch(batch_id, files, status=status, **{stamp: int(time.time())}, **ids,
                                           **changes)
        except BaseException:
            for pending, _ in files:
                pending.discard()
            raise


class _GroupCommitter:
    """Commits finished lines in groups: everything that finished while the previous commit was
    fsyncing goes in the next one, so 64 concurrent lines do not queue for 64 fsyncs."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._rows: list[LineResult] = []
        self._waiters: list[asyncio.Future] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batch result commits")

    def put(self, row: LineResult) -> asyncio.Future:
        """Queue a row; the future resolves once it is committed."""
        if self._task is None:
            self.start()
        fut = asyncio.get_running_loop().create_future()
        self._rows.append(row)
        self._waiters.append(fut)
        self._wake.set()
        return fut

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        if self._task is None:
            self.start()
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._wake.set()
        await fut

    async def close(self) -> None:
        if self._task is not None:
            await self.flush()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            rows, waiters = self._rows, self._waiters
            self._rows, self._waiters = [], []
            error: Exception | None = None
            if rows:
                try:
                    await asyncio.to_thread(self._store.add_results, rows)
                except Exception as e:
                    log.exception("committing %d batch results failed", len(rows))
                    error = e
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(error) if error is not None else fut.set_result(None)


# -- lines -----------------------------------------------------------------------------------------
def parse_line(raw: bytes, endpoint: str) -> tuple[str, dict]:
    """One input line -> (custom_id, body); raises _BadLine saying what is wrong."""
    try:
        obj = json.loads(raw.removeprefix(_BOM))
    except ValueError as e:
        raise _BadLine("invalid_json", f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _BadLine("invalid_request", "a request line must be a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _BadLine("invalid_custom_id", "custom_id must be a non-empty string")
    if obj.get("method") != "POST":
        raise _BadLine("invalid_method", f"method must be 'POST'; got {obj.get('method')!r}", custom_id)
    if obj.get("url") != endpoint:
        raise _BadLine("invalid_url", f"url {obj.get('url')!r} is not the batch's endpoint {endpoint!r}",
                       custom_id)
    if not isinstance(obj.get("body"), dict):
        raise _BadLine("invalid_body", "body must be a JSON object", custom_id)
    return custom_id, obj["body"]


def _validate_file(path: Path, batch_id: str, endpoint: str) -> _Validation:
    found = _Validation()
    first_seen: dict[str, int] = {}
    duplicates = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            found.total += 1
            try:
                custom_id: str | None = parse_line(raw, endpoint)[0]
            except _BadLine as e:
                custom_id = e.custom_id
                found.line_errors.append(LineResult(batch_id, line_no, False,
                                                    _error_doc(custom_id, e.code, f"line {line_no}: {e}")))
            if custom_id is None:
                continue
            first = first_seen.setdefault(custom_id, line_no)
            if first != line_no:
                duplicates += 1
                if duplicates < MAX_BATCH_ERRORS:
                    found.batch_errors.append(_batch_error(
                        "duplicate_custom_id", f"line {line_no}: custom_id {custom_id!r} was already used on "
                        f"line {first}; custom_ids must be unique within a batch", "custom_id", line_no))
    if duplicates >= MAX_BATCH_ERRORS:
        found.batch_errors.append(_batch_error(
            "duplicate_custom_id", f"{duplicates - len(found.batch_errors)} more duplicate custom_ids",
            "custom_id"))
    return found


def _expired_lines(path: Path, batch: Batch, done: set[int]) -> list[LineResult] | None:
    """Error rows for the lines the completion window cut off; None if the input file is gone (the
    lines cannot be named then, but the batch did expire)."""
    late = []
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    with f:
        for line_no, raw in enumerate(f, 1):
            if line_no in done or not raw.strip():
                continue
            with contextlib.suppress(_BadLine):
                custom_id = parse_line(raw, batch.endpoint)[0]
                late.append(LineResult(batch.id, line_no, False, _error_doc(
                    custom_id, "batch_expired", "This request could not be executed before the completion "
                    "window expired.")))
    return late


def _response_doc(custom_id: str, status: int, body: dict) -> str:
    return json.dumps({"id": new_id("batch_req_"), "custom_id": custom_id,
                       "response": {"status_code": status, "request_id": new_id("req_"), "body": body},
                       "error": None})


def _error_doc(custom_id: str | None, code: str, message: str) -> str:
    return json.dumps({"id": new_id("batch_req_"), "custom_id": custom_id, "response": None,
                       "error": {"code": code, "message": message}})


def _batch_error(code: str, message: str, param: str | None = None, line: int | None = None) -> dict:
    return {"code": code, "message": message, "param": param, "line": line}


def _check_metadata(metadata: object) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or len(metadata) > 16:
        raise APIError(400, "metadata must be an object of at most 16 key-value pairs", "metadata")
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > 64 or len(value) > 512:
            raise APIError(400, "metadata keys must be strings of at most 64 characters and values strings "
                           "of at most 512 characters", "metadata")
