"""The batch runner under faults, in-process with a fake execute (no HTTP, no model): concurrency slots
survive cancels, lines in flight at an engine fault run again (and a poison line stops after a bound),
and an internal error in a batch's driver loses nothing committed."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

from conserve.async_engine import EngineDeadError
from conserve.server.batch_retry import EngineRetry
from conserve.server.batches import BatchRunner
from conserve.server.store import Batch, LineResult, Store
from test_batch_store import CHAT, new_batch, put_file, requests, wait_status


def answer(text: str) -> tuple[int, dict]:
    return 200, {"object": "chat.completion", "choices": [{"message": {"content": f"echo {text}"}}]}


def docs(store: Store, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in store.file_path(file_id).read_text().splitlines()]


def fast_retry(**kw) -> EngineRetry:
    return EngineRetry(delay_s=0.001, poll_s=0.001, **kw)


# -- slots ---------------------------------------------------------------------------------------------
def test_lines_cancelled_before_their_first_step_free_their_slots(tmp_path):
    """A cancel (or expiry) can land after a line's task was created and before it ran a step; such a
    task never runs its own code, so its slot must be freed from outside it."""
    store = Store(tmp_path)
    f = put_file(store, requests(6))
    calls: list[str] = []
    parked = asyncio.Event()

    async def execute(endpoint: str, body: dict, deadline: float | None = None) -> tuple[int, dict]:
        text = body["messages"][-1]["content"]
        calls.append(text)
        if text.startswith("park"):
            await parked.wait()  # never set: only a cancel ends it
        return answer(text)

    async def main() -> list[Batch]:
        loop = asyncio.get_running_loop()
        runner = BatchRunner(store, execute, max_concurrency=2)
        to_cancel: set[str] = set()

        def task_factory(loop, coro, **kw):
            task = asyncio.Task(coro, loop=loop, **kw)
            batch = coro.cr_frame.f_locals.get("batch") if coro.__qualname__ in ("BatchRunner._run_line", "BatchRunner._slotted_line") else None
            if batch is not None and batch.id in to_cancel:
                runner._stop(runner._jobs[batch.id], "cancel")  # before the line's first step
                task.cancel()
            return task

        loop.set_task_factory(task_factory)
        await runner.start()
        cancelled = []
        for _ in range(5):  # each one would leak both slots
            b = await runner.create(f.id, CHAT)
            to_cancel.add(b.id)
            cancelled.append(await wait_status(store, b.id, ("cancelled",)))
        # Cancels through the API, each while its batch has a line parked and lines still waiting.
        parking = put_file(store, b"".join(json.dumps({"custom_id": f"p{i}", "method": "POST", "url": CHAT, "body": {
            "messages": [{"role": "user", "content": f"park{i}"}]}}).encode() + b"\n" for i in range(5)))
        for _ in range(5):
            b = await runner.create(parking.id, CHAT)
            while store.get_batch(b.id).status != "in_progress" or not calls or not calls[-1].startswith("park"):
                await asyncio.sleep(0.005)
            await runner.cancel(b.id)
            cancelled.append(await wait_status(store, b.id, ("cancelled",)))
        calls.clear()
        last = await runner.create(f.id, CHAT)
        done = await wait_status(store, last.id, ("completed",))
        await runner.shutdown()
        loop.set_task_factory(None)
        return [*cancelled, done]

    *cancelled, done = asyncio.run(main())
    assert all(b.status == "cancelled" for b in cancelled)
    assert done.completed == 6 and sorted(calls) == [f"q{i}" for i in range(6)]
    store.close()


# -- engine faults --------------------------------------------------------------------------------------
def test_lines_in_flight_at_engine_faults_run_again_and_answer_once(tmp_path):
    store = Store(tmp_path)
    f = put_file(store, requests(12))
    faults_left = {"q1": 1, "q4": 2, "q7": 2}  # q4 and q7 run alone from their third try on
    calls: Counter[str] = Counter()
    running: set[str] = set()
    alone_violations: list[tuple[str, set[str]]] = []

    async def execute(endpoint: str, body: dict, deadline: float | None = None) -> tuple[int, dict]:
        text = body["messages"][-1]["content"]
        calls[text] += 1
        if calls[text] > 2 and running:  # a line past its second fault must run alone
            alone_violations.append((text, set(running)))
        running.add(text)
        try:
            await asyncio.sleep(0.001)
            if faults_left.get(text, 0) > 0:
                faults_left[text] -= 1
                raise EngineDeadError("the engine stopped: boom")
            return answer(text)
        finally:
            running.discard(text)

    async def main() -> Batch:
        runner = BatchRunner(store, execute, max_concurrency=4, retry=fast_retry(max_faults=3))
        await runner.start()
        b = await runner.create(f.id, CHAT)
        done = await wait_status(store, b.id, ("completed",))
        await runner.shutdown()
        return done

    done = asyncio.run(main())
    assert (done.completed, done.failed) == (12, 0) and done.error_file_id is None
    out = docs(store, done.output_file_id)
    assert [d["custom_id"] for d in out] == [f"q{i}" for i in range(12)]  # each exactly once, in order
    assert all(d["response"]["body"]["choices"][0]["message"]["content"] == f"echo {d['custom_id']}" for d in out)
    assert calls == Counter({f"q{i}": 1 for i in range(12)} | {"q1": 2, "q4": 3, "q7": 3})
    assert alone_violations == []
    store.close()


def test_a_poison_line_is_failed_after_max_faults_and_the_rest_complete(tmp_path):
    store = Store(tmp_path)
    f = put_file(store, requests(6))
    calls: Counter[str] = Counter()

    async def execute(endpoint: str, body: dict, deadline: float | None = None) -> tuple[int, dict]:
        text = body["messages"][-1]["content"]
        calls[text] += 1
        await asyncio.sleep(0.001)
        if text == "q2":
            raise EngineDeadError("the engine stopped: poisoned")
        return answer(text)

    async def main() -> Batch:
        runner = BatchRunner(store, execute, max_concurrency=3, retry=fast_retry(max_faults=3))
        await runner.start()
        b = await runner.create(f.id, CHAT)
        done = await wait_status(store, b.id, ("completed",))
        await runner.shutdown()
        return done

    done = asyncio.run(main())
    assert (done.completed, done.failed) == (5, 1)
    assert calls["q2"] == 3 and all(calls[f"q{i}"] == 1 for i in (0, 1, 3, 4, 5))
    [err] = docs(store, done.error_file_id)
    assert err["custom_id"] == "q2" and err["response"]["status_code"] == 500
    error = err["response"]["body"]["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_error" and "3 times" in error["message"]
    assert [d["custom_id"] for d in docs(store, done.output_file_id)] == ["q0", "q1", "q3", "q4", "q5"]
    store.close()


def test_lines_wait_for_the_engine_to_be_back_before_running(tmp_path):
    store = Store(tmp_path)
    f = put_file(store, requests(3))
    calls: list[str] = []
    ready = {"now": False, "asked": 0}

    def engine_ready() -> bool:
        ready["asked"] += 1
        return ready["now"]

    async def execute(endpoint: str, body: dict, deadline: float | None = None) -> tuple[int, dict]:
        calls.append(body["messages"][-1]["content"])
        return answer(calls[-1])

    async def main() -> Batch:
        runner = BatchRunner(store, execute, retry=EngineRetry(engine_ready, poll_s=0.001))
        await runner.start()
        b = await runner.create(f.id, CHAT)
        while ready["asked"] < 30:  # every line has asked several times
            await asyncio.sleep(0.001)
        assert calls == [] and store.get_batch(b.id).status == "in_progress"
        ready["now"] = True
        done = await wait_status(store, b.id, ("completed",))
        await runner.shutdown()
        return done

    done = asyncio.run(main())
    assert done.completed == 3 and sorted(calls) == ["q0", "q1", "q2"]
    store.close()


def test_max_faults_one_fails_a_line_at_its_first_fault(tmp_path):
    store = Store(tmp_path)
    f = put_file(store, requests(2))
    calls: Counter[str] = Counter()

    async def execute(endpoint: str, body: dict, deadline: float | None = None) -> tuple[int, dict]:
        text = body["messages"][-1]["content"]
        calls[text] += 1
        if text == "q0":
            raise EngineDeadError("the engine stopped")
        return answer(text)

    async def main() -> Batch:
        runner = BatchRunner(store, execute, retry=fast_retry(max_faults=1))
        await runner.start()
        b = await runner.create(f.id, CHAT)
        done = await wait_status(store, b.id, ("completed",))
        await runner.shutdown()
        return done

    done = asyncio.run(main())
    assert (done.completed, done.failed) == (1, 1) and calls == Counter({"q0": 1, "q1": 1})
    with pytest.raises(ValueError):
        EngineRetry(max_faults=0)
    store.close()


# -- driver errors --------------------------------------------------------------------------------------
def test_a_failed_commit_keeps_committed_lines_and_the_batch_finishes(tmp_path, monkeypatch):
    store = Store(tmp_path)
    f = put_file(store, requests(8))
    calls: Counter[str] = Counter()
    commits = {"n": 0}
    add = store.add_results

    def flaky_add(rows):
        commits["n"] += 1
        if commits["n"] == 3:
            raise OSError("disk hiccup")
        add(rows)

    monkeypatch.setattr(store, "add_results", flaky_add)

    async def execute(endpoint: str, body: dict, deadline: float | None = None) -> tuple[int, dict]:
        text = body["messages"][-1]["content"]
        calls[text] += 1
        return answer(text)

    async def main() -> Batch:
        runner = BatchRunner(store, execute, max_concurrency=1, driver_delay_s=0.001)
        await runner.start()
        b = await runner.create(f.id, CHAT)
        done = await wait_status(store, b.id, ("completed", "failed"))
        await runner.shutdown()
        return done

    done = asyncio.run(main())
    assert done.status == "completed" and (done.completed, done.failed) == (8, 0)
    assert [d["custom_id"] for d in docs(store, done.output_file_id)] == [f"q{i}" for i in range(8)]
    # Lines committed before the error did not run again; the one whose commit failed did.
    assert calls["q0"] == calls["q1"] == 1 and calls["q2"] == 2 and sum(calls.values()) == 9
    store.close()


def test_a_failing_finalize_leaves_the_batch_resumable_with_its_lines(tmp_path, monkeypatch):
    store = Store(tmp_path)
    f = put_file(store, requests(5))
    calls: list[str] = []

    tries = {"n": 0}

    def broken_finish(*args, **kw):
        tries["n"] += 1
        raise OSError("disk full")

    async def execute(endpoint: str, body: dict, deadline: float | None = None) -> tuple[int, dict]:
        calls.append(body["messages"][-1]["content"])
        return answer(calls[-1])

    async def first() -> str:
        runner = BatchRunner(store, execute, driver_delay_s=0.001)
        await runner.start()
        b = await runner.create(f.id, CHAT)
        while tries["n"] < 3:  # the driver tried to finish it, and tried again
            await asyncio.sleep(0.005)
        await runner.shutdown()
        return b.id

    finish = store.finish_batch
    monkeypatch.setattr(store, "finish_batch", broken_finish)
    batch_id = asyncio.run(first())
    stuck = store.get_batch(batch_id)
    assert stuck.status == "finalizing" and stuck.completed == 5
    assert store.finished_lines(batch_id) == {1, 2, 3, 4, 5}  # nothing committed was dropped

    monkeypatch.setattr(store, "finish_batch", finish)

    async def second() -> Batch:
        runner = BatchRunner(store, execute)
        await runner.start()
        done = await wait_status(store, batch_id, ("completed",))
        await runner.shutdown()
        return done

    done = asyncio.run(second())
    assert [d["custom_id"] for d in docs(store, done.output_file_id)] == [f"q{i}" for i in range(5)]
    assert sorted(calls) == [f"q{i}" for i in range(5)]  # each ran once, across both runners
    store.close()


def test_an_input_file_deleted_mid_batch_fails_it_with_its_finished_lines_kept(tmp_path):
    store = Store(tmp_path)
    f = put_file(store, requests(4))
    b = new_batch(store, f.id, status="in_progress", total=4)
    store.add_results([LineResult(b.id, 1, True, json.dumps({"custom_id": "q0", "kept": True}))])
    store.delete_file(f.id)

    async def main() -> Batch:
        runner = BatchRunner(store, lambda *_: pytest.fail("nothing can run"))
        await runner.start()
        done = await wait_status(store, b.id, ("failed",))
        await runner.shutdown()
        return done

    done = asyncio.run(main())
    assert done.errors[0]["code"] == "file_not_found"
    assert docs(store, done.output_file_id) == [{"custom_id": "q0", "kept": True}]
    store.close()
