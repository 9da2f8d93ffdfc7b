"""The durable store and the batch runner in-process (no HTTP, no model): persistence across reopen,
crash leftovers, status guards, idempotent results, resume after a crash, group commit."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from conserve.server.batches import BatchRunner
from conserve.server.store import Batch, LineResult, Store, new_id

CHAT = "/v1/chat/completions"


def put_file(store: Store, data: bytes, purpose: str = "batch"):
    pending = store.new_file()
    pending.write(data)
    return store.commit_file(pending, "in.jsonl", purpose)


def new_batch(store: Store, input_file_id: str, status: str = "validating", **kw) -> Batch:
    now = int(time.time())
    b = Batch(id=new_id("batch_"), endpoint=CHAT, input_file_id=input_file_id, completion_window="24h",
              status=status, created_at=now, expires_at=now + 86400, **kw)
    store.create_batch(b)
    return b


def requests(n: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": CHAT,
                                "body": {"messages": [{"role": "user", "content": f"q{i}"}]}}).encode() + b"\n"
                    for i in range(n))


def recording_execute(calls: list[str], delay: float = 0.0):
    async def execute(endpoint: str, body: dict, deadline: float | None = None) -> tuple[int, dict]:
        await asyncio.sleep(delay)
        text = body["messages"][-1]["content"]
        calls.append(text)
        return 200, {"object": "chat.completion", "choices": [{"message": {"content": text}}]}
    return execute


async def wait_status(store: Store, batch_id: str, statuses: tuple[str, ...], timeout: float = 10.0) -> Batch:
    deadline = time.monotonic() + timeout
    while (b := store.get_batch(batch_id)).status not in statuses:
        assert time.monotonic() < deadline, f"batch still {b.status}"
        await asyncio.sleep(0.01)
    return b


def output_ids(store: Store, file_id: str) -> list[str]:
    return [json.loads(x)["custom_id"] for x in store.file_path(file_id).read_text().splitlines()]


# -- store -----------------------------------------------------------------------------------------
def test_files_and_batches_survive_reopen(tmp_path):
    store = Store(tmp_path)
    f = put_file(store, b"hello\n")
    b = new_batch(store, f.id, metadata={"k": "v"})
    store.close()
    store = Store(tmp_path)
    assert store.get_file(f.id) == f and store.file_path(f.id).read_bytes() == b"hello\n"
    assert store.get_batch(b.id) == b and [x.id for x in store.unfinished_batches()] == [b.id]
    store.close()


def test_crash_leftovers_are_removed_and_data_dir_is_locked(tmp_path):
    store = Store(tmp_path)
    kept = put_file(store, b"kept")
    half = store.new_file()  # an upload in flight when the process died
    half.write(b"partial")
    orphan = store.new_file()  # sealed but its row never committed
    orphan.write(b"x")
    orphan.seal()
    with pytest.raises(RuntimeError, match="in use"):
        Store(tmp_path)
    store.close()
    store = Store(tmp_path)
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [kept.id]
    store.close()


def test_list_pagination(tmp_path):
    store = Store(tmp_path)
    files = [put_file(store, b"x") for _ in range(5)]
    page, more = store.list_files(limit=2)
    assert [f.id for f in page] == [files[4].id, files[3].id] and more
    page, more = store.list_files(limit=10, after=files[3].id)
    assert [f.id for f in page] == [files[2].id, files[1].id, files[0].id] and not more
    assert [f.id for f in store.list_files(ascending=True, after=files[3].id)[0]] == [files[4].id]
    assert store.list_files(purpose="batch_output")[0] == []
    with pytest.raises(LookupError):
        store.list_batches(after="batch_nope")
    assert store.delete_file(files[0].id) and not store.delete_file(files[0].id)
    assert not store.file_path(files[0].id).exists()
    store.close()


def test_results_are_idempotent_and_status_guards_hold(tmp_path):
    store = Store(tmp_path)
    b = new_batch(store, "file-x", status="in_progress", total=3)
    rows = [LineResult(b.id, 1, True, '{"a": 1}'), LineResult(b.id, 2, False, '{"b": 2}')]
    store.add_results(rows)
    store.add_results(rows + [LineResult(b.id, 3, True, '{"c": 3}')])  # a replay counts nothing twice
    got = store.get_batch(b.id)
    assert (got.completed, got.failed) == (2, 1) and store.finished_lines(b.id) == {1, 2, 3}
    assert list(store.result_docs(b.id, True)) == ['{"a": 1}', '{"c": 3}']
    got = store.update_batch(b.id, if_status=("validating",), status="cancelling")
    assert got.status == "in_progress"  # the guard refused the move
    out = store.new_file()
    out.write(b"o\n")
    out.seal()
    done = store.finish_batch(b.id, [(out, "o.jsonl")], status="completed", output_file_id=out.id)
    assert done.status == "completed" and store.get_file(out.id).purpose == "batch_output"
    assert store.finished_lines(b.id) == set() and store.unfinished_batches() == []
    store.close()


# -- runner: resume and group commit ------------------------------------------------------------------
def test_resume_keeps_committed_lines_and_runs_the_rest(tmp_path):
    store = Store(tmp_path)
    f = put_file(store, requests(10))
    b = new_batch(store, f.id, status="in_progress", total=10)
    # As if the server died with lines 1, 2 and 5 committed (line N holds q{N-1}).
    kept = [LineResult(b.id, n, True, json.dumps({"custom_id": f"q{n - 1}", "kept": True})) for n in (1, 2, 5)]
    store.add_results(kept)
    calls: list[str] = []

    async def main() -> Batch:
        runner = BatchRunner(store, recording_execute(calls), max_concurrency=3)
        await runner.start()
        done = await wait_status(store, b.id, ("completed",))
        await runner.shutdown()
        return done

    done = asyncio.run(main())
    assert sorted(calls) == sorted(f"q{i}" for i in range(10) if i not in (0, 1, 4))
    assert (done.completed, done.failed, done.total) == (10, 0, 10)
    docs = [json.loads(x) for x in store.file_path(done.output_file_id).read_text().splitlines()]
    assert [d["custom_id"] for d in docs] == [f"q{i}" for i in range(10)]
    assert [d.get("kept", False) for d in docs[:2]] == [True, True]  # the committed results, verbatim
    store.close()


def test_resume_of_cancelling_and_finalizing_batches(tmp_path):
    store = Store(tmp_path)
    f = put_file(store, requests(4))
    cancelling = new_batch(store, f.id, status="cancelling", total=4)
    finalizing = new_batch(store, f.id, status="finalizing", total=4)
    store.add_results([LineResult(finalizing.id, n, True, json.dumps({"custom_id": f"q{n - 1}"}))
                       for n in range(1, 5)])
    calls: list[str] = []

    async def main() -> None:
        runner = BatchRunner(store, recording_execute(calls))
        await runner.start()
        await wait_status(store, cancelling.id, ("cancelled",))
        await wait_status(store, finalizing.id, ("completed",))
        await runner.shutdown()

    asyncio.run(main())
    assert calls == []
    assert store.get_batch(cancelling.id).output_file_id is None
    assert output_ids(store, store.get_batch(finalizing.id).output_file_id) == ["q0", "q1", "q2", "q3"]
    store.close()


def test_shutdown_mid_run_then_restart_finishes(tmp_path):
    store = Store(tmp_path)
    f = put_file(store, requests(20))
    calls: list[str] = []

    async def first() -> str:
        runner = BatchRunner(store, recording_execute(calls, delay=0.05), max_concurrency=2)
        await runner.start()
        b = await runner.create(f.id, CHAT)
        while store.get_batch(b.id).completed < 4:
            await asyncio.sleep(0.01)
        await runner.shutdown()
        return b.id

    batch_id = asyncio.run(first())
    mid = store.get_batch(batch_id)
    assert mid.status == "in_progress" and 4 <= mid.completed < 20
    before = set(calls)
    committed = {f"q{n - 1}" for n in store.finished_lines(batch_id)}
    calls.clear()

    async def second() -> Batch:
        runner = BatchRunner(store, recording_execute(calls), max_concurrency=2)
        await runner.start()
        done = await wait_status(store, batch_id, ("completed",))
        await runner.shutdown()
        return done

    done = asyncio.run(second())
    assert not set(calls) & committed and set(calls) | committed == {f"q{i}" for i in range(20)}
    assert before >= committed and done.completed == 20
    assert output_ids(store, done.output_file_id) == [f"q{i}" for i in range(20)]
    store.close()


def test_lines_finishing_together_share_commits(tmp_path, monkeypatch):
    store = Store(tmp_path)
    f = put_file(store, requests(64))
    commits: list[int] = []
    add = store.add_results
    monkeypatch.setattr(store, "add_results", lambda rows: (commits.append(len(rows)), add(rows)))

    async def main() -> Batch:
        runner = BatchRunner(store, recording_execute([], delay=0.01), max_concurrency=64)
        await runner.start()
        b = await runner.create(f.id, CHAT)
        done = await wait_status(store, b.id, ("completed",))
        await runner.shutdown()
        return done

    done = asyncio.run(main())
    assert done.completed == 64 and sum(commits) == 64 and len(commits) < 32
    store.close()


def test_runner_create_refusals(tmp_path):
    from conserve.server.errors import APIError

    store = Store(tmp_path)
    out = put_file(store, b"x", purpose="batch_output")

    async def main() -> None:
        runner = BatchRunner(store, recording_execute([]))
        await runner.start()
        for args, status in (((out.id, CHAT), 400), (("file-nope", CHAT), 404), ((out.id, "/v1/x"), 400)):
            with pytest.raises(APIError) as e:
                await runner.create(*args)
            assert e.value.status == status
        await runner.shutdown()

    asyncio.run(main())
    store.close()


def test_data_dir_layout(tmp_path):
    store = Store(tmp_path / "nested" / "dir")
    put_file(store, b"x")
    assert {p.name for p in Path(tmp_path / "nested" / "dir").iterdir()} >= {"conserve.db", "files", "lock"}
    store.close()
