"""Batch deadlines in-process (no HTTP, no model): lines reach the engine earliest deadline first and
carry their deadline; the batch's progress and estimated completion are in its metadata, valid
against OpenAI's schema; a batch that cannot meet its window runs until the window has passed."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from conserve.server.batch_estimate import BatchWork, completion_times, rough_cost, window_seconds
from conserve.server.batch_slots import PrioritySlots
from conserve.server.batches import BatchRunner
from conserve.server.store import Store
from test_batch_store import CHAT, put_file, wait_status


def lines(prefix: str, n: int, max_tokens: int = 16) -> bytes:
    return b"".join(json.dumps({"custom_id": f"{prefix}{i}", "method": "POST", "url": CHAT, "body": {
        "messages": [{"role": "user", "content": f"{prefix}{i}"}], "max_tokens": max_tokens}}).encode() + b"\n"
        for i in range(n))


def answering(calls: list, gate: asyncio.Event | None = None, free: tuple[str, ...] = (), delay: float = 0.0):
    """A fake execute: records (text, deadline), waits for `gate` unless the text is in `free`, and
    answers with a usage of 1 prompt and 2 completion tokens."""
    async def execute(endpoint: str, body: dict, deadline: float | None = None) -> tuple[int, dict]:
        text = body["messages"][-1]["content"]
        calls.append((text, deadline))
        if gate is not None and text not in free:
            await gate.wait()
        await asyncio.sleep(delay)
        return 200, {"object": "chat.completion", "choices": [{"message": {"content": text}}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    return execute


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# -- pure parts ------------------------------------------------------------------------------------
def test_completion_windows():
    assert window_seconds("24h") == 86400 and window_seconds("30m") == 1800 and window_seconds("7d") == 7 * 86400
    for bad in ("8d", "0m", "90s", "24H", " 1h", 24, None, "1.5h"):
        assert window_seconds(bad) is None


def test_work_is_costed_at_max_tokens_until_lines_show_what_they_generate():
    work = BatchWork()
    for line in (1, 2, 3, 4):
        work.add_line(line, prompt=10, max_out=20)
    assert work.remaining_tokens == 120 and work.progress == 0
    work.finish_line(1, {"prompt_tokens": 10, "completion_tokens": 5})  # stopped at EOS after 5 of 20
    work.finish_line(2, None)  # failed: nothing to learn, nothing left to do
    assert work.output_share == 0.25 and work.done_tokens == 15
    assert work.remaining_tokens == 2 * (10 + 20 * 0.25)
    assert work.progress == pytest.approx(15 / (15 + 30))
    resumed = BatchWork()
    resumed.add_line(1, 10, 20, finished=True)  # finished before a restart: counted as planned
    resumed.add_line(2, 10, 20)
    assert resumed.progress == 0.5


def test_completion_times_queue_the_batches_in_service_order():
    assert completion_times([100, 50], rate=10.0, now=1000.0) == [1010.0, 1015.0]
    assert completion_times([100], rate=None, now=0.0) == [None]
    assert completion_times([100], rate=0.0, now=0.0) == [None]


def test_rough_cost_without_a_tokenizer():
    assert rough_cost(CHAT, {"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 7}) == (10, 7)
    assert rough_cost("/v1/completions", {"prompt": "abcd"}) == (1, 16)


def test_priority_slots_go_to_the_smallest_key_and_skip_cancelled_waiters():
    async def main() -> list:
        slots, got = PrioritySlots(1), []
        await slots.acquire((0,))

        async def want(key):
            await slots.acquire(key)
            got.append(key)

        tasks = {k: asyncio.create_task(want(k)) for k in [(5,), (2,), (9,), (1,)]}
        await asyncio.sleep(0.01)
        tasks[(1,)].cancel()
        await asyncio.sleep(0.01)
        for _ in range(3):
            slots.release()
            await asyncio.sleep(0.01)
        slots.release()
        await asyncio.sleep(0.01)
        await slots.acquire((0,))  # the slot came back: nothing is lost to the cancelled waiter
        return got

    assert asyncio.run(main()) == [(2,), (5,), (9,)]


# -- the runner ------------------------------------------------------------------------------------
@pytest.mark.parametrize("deadlines", [True, False])
def test_lines_reach_the_engine_earliest_deadline_first(tmp_path, deadlines):
    store = Store(tmp_path)
    loose_file, tight_file = put_file(store, lines("loose", 4)), put_file(store, lines("tight", 4))
    calls: list = []

    async def main():
        gate = asyncio.Event()
        runner = BatchRunner(store, answering(calls, gate), max_concurrency=1, deadlines=deadlines)
        await runner.start()
        loose = await runner.create(loose_file.id, CHAT, "24h")
        await until(lambda: calls)  # loose0 holds the one slot
        tight = await runner.create(tight_file.id, CHAT, "30m")
        await asyncio.sleep(0.1)  # both drivers wait for the slot
        gate.set()
        for b in (loose, tight):
            await wait_status(store, b.id, ("completed",))
        await runner.shutdown()
        return loose, tight

    loose, tight = asyncio.run(main())
    order = [text for text, _ in calls]
    if deadlines:
        assert order == ["loose0", "tight0", "tight1", "tight2", "tight3", "loose1", "loose2", "loose3"]
        assert {d for t, d in calls if t.startswith("tight")} == {float(tight.expires_at)}
        assert tight.expires_at == tight.created_at + 1800 and loose.expires_at == loose.created_at + 86400
    else:
        assert order == [f"loose{i}" for i in range(4)] + [f"tight{i}" for i in range(4)]
        assert {d for _, d in calls} == {None}
    store.close()


def test_progress_and_estimate_in_metadata(tmp_path):
    openai_schema = pytest.importorskip("openai_schema")
    store = Store(tmp_path)
    first, second = put_file(store, lines("a", 4)), put_file(store, lines("b", 2))
    calls: list = []

    async def main():
        gate = asyncio.Event()
        runner = BatchRunner(store, answering(calls, gate, free=("a0", "a1")), harvest_rate=lambda: 10.0)
        await runner.start()
        created = runner.to_api(await runner.create(first.id, CHAT, "24h", metadata={"team": "x"}))
        meta = created["metadata"]
        # Costed at creation: 4 lines of 1 prompt token (4 characters) + 16 output tokens, at 10 tokens/s.
        assert meta["team"] == "x" and meta["conserve_progress"] == "0.000"
        assert int(meta["conserve_estimated_completion_at"]) == pytest.approx(time.time() + 68 / 10, abs=2)
        assert meta["conserve_meets_window"] == "true"
        openai_schema.assert_valid("Batch", created)
        await until(lambda: store.get_batch(created["id"]).completed == 2)
        running = runner.to_api(store.get_batch(created["id"]))
        openai_schema.assert_valid("Batch", running)
        # Two lines done (3 tokens each); the two left are costed at the 2 of 16 tokens lines generate.
        assert running["metadata"]["conserve_progress"] == "0.500"
        assert int(running["metadata"]["conserve_estimated_completion_at"]) < int(
            meta["conserve_estimated_completion_at"])
        # A batch with a nearer deadline is served first: its estimate comes before the first one's.
        tight = runner.to_api(await runner.create(second.id, CHAT, "30m"))
        status = runner.live_status()
        assert status[tight["id"]]["estimated_completion_at"] < status[created["id"]]["estimated_completion_at"]
        gate.set()
        done = await wait_status(store, created["id"], ("completed",))
        await wait_status(store, tight["id"], ("completed",))
        await runner.shutdown()
        return runner.to_api(done)

    done = asyncio.run(main())
    assert done["metadata"] == {"team": "x"}  # a finished batch carries the user's metadata only
    store.close()


def test_server_keys_only_fill_what_the_users_metadata_leaves(tmp_path):
    store = Store(tmp_path)
    f = put_file(store, lines("a", 2))

    async def main():
        gate = asyncio.Event()
        runner = BatchRunner(store, answering([], gate), harvest_rate=lambda: 10.0)
        await runner.start()
        full = runner.to_api(await runner.create(f.id, CHAT, "24h", metadata={f"k{i}": "v" for i in range(16)}))
        one = runner.to_api(await runner.create(f.id, CHAT, "24h", metadata={f"k{i}": "v" for i in range(15)}))
        gate.set()
        await runner.shutdown()
        return full, one

    full, one = asyncio.run(main())
    assert len(full["metadata"]) == 16 and not any(k.startswith("conserve_") for k in full["metadata"])
    assert len(one["metadata"]) == 16 and "conserve_progress" in one["metadata"]
    store.close()


def test_a_batch_that_cannot_meet_its_window_runs_until_the_window_has_passed(tmp_path):
    store = Store(tmp_path)
    f = put_file(store, lines("s", 40))
    calls: list = []

    async def main():
        runner = BatchRunner(store, answering(calls, delay=0.1), max_concurrency=1, window_s=2.0,
                             harvest_rate=lambda: 0.01)  # an estimate of hours: far past the window
        await runner.start()
        b = await runner.create(f.id, CHAT, "24h")
        await asyncio.sleep(1.0)
        running = runner.to_api(store.get_batch(b.id))
        done = await wait_status(store, b.id, ("expired",))
        await runner.shutdown()
        return b, running, done

    b, running, done = asyncio.run(main())
    # Known to be late, it still ran its lines; it expired only at expires_at, keeping what it finished.
    assert running["status"] == "in_progress" and running["metadata"]["conserve_meets_window"] == "false"
    assert running["request_counts"]["completed"] >= 3
    assert done.expired_at >= b.expires_at and 0 < done.completed < 40 and done.failed == 40 - done.completed
    out = [json.loads(x)["custom_id"] for x in store.file_path(done.output_file_id).read_text().splitlines()]
    err = [json.loads(x) for x in store.file_path(done.error_file_id).read_text().splitlines()]
    assert {e["error"]["code"] for e in err} == {"batch_expired"}
    assert sorted(out + [e["custom_id"] for e in err]) == sorted(f"s{i}" for i in range(40))
    store.close()
