"""The Files and Batches API over real HTTP with the official `openai` client, a fake execute (no model),
crash recovery under SIGKILL, and the `conserve batch` client."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from batch_server_app import build_app
from conserve.batch_client import main as batch_main
from conserve.server.store import Store

openai = pytest.importorskip("openai")

CHAT = "/v1/chat/completions"
HERE = Path(__file__).parent


# -- helpers ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """Run `app` with uvicorn on a free loopback port in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="test", max_retries=0, timeout=10)


def line(cid: str, url: str = CHAT, **body) -> dict:
    body = {"model": "fake", "messages": [{"role": "user", "content": cid}], **body}
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


def jsonl(items) -> bytes:
    return ("\n".join(i if isinstance(i, str) else json.dumps(i) for i in items) + "\n").encode()


def wait_done(client: openai.OpenAI, batch_id: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "expired", "cancelled"):
            return b
        assert time.monotonic() < deadline, f"batch still {b.status}"
        time.sleep(0.05)


def read_jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).content.decode().splitlines()]


def run_batch(client: openai.OpenAI, items, endpoint: str = CHAT, **kw):
    f = client.files.create(file=("in.jsonl", jsonl(items)), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h", **kw)


@pytest.fixture()
def server(tmp_path) -> Iterator[str]:
    with serve(build_app(tmp_path / "data", max_upload_bytes=16384, max_concurrency=8)) as url:
        yield url


# -- files -----------------------------------------------------------------------------------------
def test_file_roundtrip_and_404s(server, tmp_path):
    client = client_for(server)
    data = jsonl([line("a"), line("b")])
    f = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert f.id.startswith("file-") and f.object == "file" and f.bytes == len(data)
    assert (f.filename, f.purpose, f.status) == ("requests.jsonl", "batch", "processed")
    assert client.files.retrieve(f.id).model_dump() == f.model_dump()
    assert client.files.content(f.id).content == data
    g = client.files.create(file=("two.jsonl", data), purpose="batch")
    listed = client.files.list()
    assert [x.id for x in listed.data] == [g.id, f.id]  # newest first
    assert [x.id for x in client.files.list(order="asc")] == [f.id, g.id]
    deleted = client.files.delete(f.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (f.id, True, "file")
    for call in (lambda: client.files.retrieve(f.id), lambda: client.files.content(f.id),
                 lambda: client.files.delete(f.id), lambda: client.batches.retrieve("batch_nope"),
                 lambda: client.batches.cancel("batch_nope")):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["type"] == "not_found_error"
    assert not (tmp_path / "data" / "files" / f.id).exists()


def test_upload_refusals(server, tmp_path):
    client = client_for(server)
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("big.jsonl", b"x" * 20000), purpose="batch")
    assert e.value.status_code == 413
    assert e.value.body["code"] == "file_too_large" and "16384" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("t.jsonl", b"{}\n"), purpose="fine-tune")
    r = httpx.post(server + "/v1/files", json={"purpose": "batch"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(server + "/v1/files", data={"purpose": "batch"})
    assert r.status_code == 400
    r = httpx.post(server + "/v1/files", files={"file": ("a.jsonl", b"{}")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    # Nothing refused is left on disk, and nothing was registered.
    assert list((tmp_path / "data" / "files").iterdir()) == []
    assert client.files.list().data == []


# -- batches ---------------------------------------------------------------------------------------
def test_batch_runs_in_order_with_broken_lines(server):
    client = client_for(server)
    items = [line(f"r{i}", sleep=0.002 * (i % 5)) for i in range(30)]
    items[3] = line("r3", max_tokens=-1)                            # execute answers 400
    items[7] = '{"custom_id": "r7", "method": "POST", "url": '      # not JSON
    items[11] = line("r11", url="/v1/completions")                  # another endpoint
    items[15] = {"custom_id": "r15", "method": "POST", "url": CHAT, "body": "hi"}
    items[19] = {"method": "POST", "url": CHAT, "body": {}}         # no custom_id
    items.insert(20, "")                                             # blank lines are skipped
    b = run_batch(client, items, metadata={"job": "test"})
    assert b.id.startswith("batch_") and b.object == "batch" and b.status == "validating"
    assert b.endpoint == CHAT and b.completion_window == "24h" and b.expires_at == b.created_at + 86400
    b = wait_done(client, b.id)
    assert b.status == "completed" and b.metadata == {"job": "test"} and b.errors is None
    assert b.request_counts.model_dump() == {"total": 30, "completed": 25, "failed": 5}
    assert b.in_progress_at and b.finalizing_at and b.completed_at and b.failed_at is None
    out, err = read_jsonl(client, b.output_file_id), read_jsonl(client, b.error_file_id)
    expect_ok = [f"r{i}" for i in range(30) if i not in (3, 7, 11, 15, 19)]
    assert [o["custom_id"] for o in out] == expect_ok
    for o in out:
        assert o["id"].startswith("batch_req_") and o["error"] is None
        assert o["response"]["status_code"] == 200 and o["response"]["request_id"]
        assert o["response"]["body"]["choices"][0]["message"]["content"] == f"echo: {o['custom_id']}"
    assert [e["custom_id"] for e in err] == ["r3", None, "r11", "r15", None]
    assert err[0]["response"]["status_code"] == 400 and err[0]["error"] is None
    assert err[0]["response"]["body"]["error"]["param"] == "max_tokens"
    codes = [e["error"]["code"] for e in err[1:]]
    assert codes == ["invalid_json", "invalid_url", "invalid_body", "invalid_custom_id"]
    assert err[1]["response"] is None and err[1]["error"]["message"].startswith("line 8:")
    for file_id in (b.output_file_id, b.error_file_id):
        f = client.files.retrieve(file_id)
        assert f.purpose == "batch_output" and f.filename.startswith(b.id)


def test_completions_endpoint_and_empty_error_file(server):
    client = client_for(server)
    items = [{"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "fake", "prompt": f"p{i}"}} for i in range(5)]
    b = wait_done(client, run_batch(client, items, endpoint="/v1/completions").id)
    assert b.status == "completed" and b.error_file_id is None
    assert [o["response"]["body"]["choices"][0]["text"] for o in read_jsonl(client, b.output_file_id)] == \
        [f"echo: p{i}" for i in range(5)]


def test_duplicate_custom_ids_fail_the_batch(server):
    client = client_for(server)
    b = wait_done(client, run_batch(client, [line("a"), line("b"), line("a"), line("b"), line("c")]).id)
    assert b.status == "failed" and b.failed_at and b.output_file_id is None
    msgs = [(e.code, e.line, e.message) for e in b.errors.data]
    unique = "custom_ids must be unique within a batch"
    assert msgs == [("duplicate_custom_id", 3, f"line 3: custom_id 'a' was already used on line 1; {unique}"),
                    ("duplicate_custom_id", 4, f"line 4: custom_id 'b' was already used on line 2; {unique}")]
    empty = wait_done(client, run_batch(client, [""]).id)
    assert empty.status == "failed" and empty.errors.data[0].code == "empty_file"


def test_create_refusals(server):
    client = client_for(server)
    f = client.files.create(file=("in.jsonl", jsonl([line("a")])), purpose="batch")
    for window in ("90s", "8d", "0m", "1 h", "24H"):  # minutes, hours or days, 1m to 7d
        with pytest.raises(openai.BadRequestError, match="completion_window"):
            client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window=window)
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="metadata"):
        client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h",
                              metadata={str(i): "v" for i in range(17)})
    for body in (b"not json", b"[]", json.dumps({"endpoint": CHAT, "completion_window": "24h"}).encode()):
        r = httpx.post(server + "/v1/batches", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(server + "/v1/batches", params={"limit": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"
    assert client.batches.list().data == []


def test_batch_list_pagination(server):
    client = client_for(server)
    f = client.files.create(file=("in.jsonl", jsonl([line("a")])), purpose="batch")
    ids = [client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h").id for _ in range(5)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    raw = httpx.get(server + "/v1/batches", params={"limit": 2, "after": ids[3]}).json()
    assert raw["object"] == "list" and raw["first_id"] == ids[2] and raw["last_id"] == ids[1] and raw["has_more"]
    assert [b.id for b in client.batches.list(limit=2)] == ids[::-1]  # the client follows has_more/after
    for i in ids:
        wait_done(client, i)


def test_cancel_mid_run(tmp_path):
    with serve(build_app(tmp_path / "data", max_concurrency=2)) as url:
        client = client_for(url)
        b = run_batch(client, [line(f"c{i}", sleep=0.1) for i in range(40)])
        while client.batches.retrieve(b.id).request_counts.completed < 4:
            time.sleep(0.02)
        c = client.batches.cancel(b.id)
        assert c.status in ("cancelling", "cancelled") and c.cancelling_at
        b = wait_done(client, b.id)
        assert b.status == "cancelled" and b.cancelled_at and b.completed_at is None
        n = b.request_counts.completed
        assert 4 <= n < 40 and b.request_counts.total == 40 and b.request_counts.failed == 0
        out = read_jsonl(client, b.output_file_id)
        order = [int(o["custom_id"][1:]) for o in out]
        assert len(out) == n and order == sorted(set(order))  # each once, in input order
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(b.id)


def test_many_cancels_in_a_row_leave_the_concurrency_slots_free(tmp_path):
    with serve(build_app(tmp_path / "data", max_concurrency=2)) as url:
        client = client_for(url)
        for round_no in range(8):  # each batch: two lines parked in execute, more still waiting
            b = run_batch(client, [line(f"r{round_no}-{i}", sleep=60) for i in range(6)])
            while client.batches.retrieve(b.id).status == "validating":
                time.sleep(0.01)
            client.batches.cancel(b.id)
            assert wait_done(client, b.id).status == "cancelled"
        b = wait_done(client, run_batch(client, [line(f"ok{i}") for i in range(6)]).id)
        assert b.status == "completed" and b.request_counts.completed == 6
        assert [o["custom_id"] for o in read_jsonl(client, b.output_file_id)] == [f"ok{i}" for i in range(6)]


def test_completion_window_expiry(tmp_path):
    with serve(build_app(tmp_path / "data", max_concurrency=2, window_s=1.0)) as url:
        client = client_for(url)
        b = wait_done(client, run_batch(client, [line(f"e{i}", sleep=0.2) for i in range(20)]).id)
        assert b.status == "expired" and b.expired_at
        counts = b.request_counts
        assert counts.total == 20 and counts.completed + counts.failed == 20 and counts.failed > 0
        err = read_jsonl(client, b.error_file_id)
        assert {e["error"]["code"] for e in err} == {"batch_expired"} and len(err) == counts.failed
        done = [o["custom_id"] for o in read_jsonl(client, b.output_file_id)] + [e["custom_id"] for e in err]
        assert sorted(done) == sorted(f"e{i}" for i in range(20))


# -- durability: SIGKILL mid-batch, restart on the same data dir -----------------------------------
def start_server(sock: socket.socket, data_dir: Path, log: Path, delay: float) -> subprocess.Popen:
    cmd = [sys.executable, str(HERE / "batch_server_app.py"), "--data-dir", str(data_dir), "--fd",
           str(sock.fileno()), "--delay", str(delay), "--log", str(log), "--concurrency", "4"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, pass_fds=[sock.fileno()], env=env)
    deadline = time.monotonic() + 20
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    while True:
        assert proc.poll() is None, "test server exited"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/v1/batches", timeout=1).status_code == 200:
                return proc
        assert time.monotonic() < deadline, "test server did not start"
        time.sleep(0.05)


def test_sigkill_mid_batch_resumes_without_rerunning(tmp_path):
    data, log = tmp_path / "data", tmp_path / "executed.log"
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    client = client_for(f"http://127.0.0.1:{sock.getsockname()[1]}")
    n = 200
    proc = start_server(sock, data, log, delay=0.05)
    try:
        upload = client.files.create(file=("in.jsonl", jsonl([line(f"k{i:03d}") for i in range(n)])), purpose="batch")
        b = client.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")
        seen = 0
        while seen < 20:
            seen = client.batches.retrieve(b.id).request_counts.completed
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        first_pid = proc.pid
    finally:
        if proc.poll() is None:
            proc.kill()
    assert seen < n, "the batch finished before the kill; slow the fake down"

    # What survived the kill: everything acknowledged, and the upload itself.
    store = Store(data)
    committed = store.finished_lines(b.id)
    assert len(committed) >= seen and store.get_batch(b.id).status == "in_progress"
    store.close()
    committed_ids = {f"k{i - 1:03d}" for i in committed}

    proc = start_server(sock, data, log, delay=0.0)
    try:
        b = wait_done(client, b.id)
        assert b.status == "completed" and b.request_counts.model_dump() == {"total": n, "completed": n, "failed": 0}
        out = read_jsonl(client, b.output_file_id)
        assert [o["custom_id"] for o in out] == [f"k{i:03d}" for i in range(n)]
        assert client.files.content(upload.id).content.count(b"\n") == n
    finally:
        proc.terminate()
        proc.wait(10)
        sock.close()
    runs = [ln.split() for ln in log.read_text().splitlines()]
    rerun = {cid for pid, cid in runs if int(pid) != first_pid}
    assert rerun and not rerun & committed_ids, "lines committed before the kill ran again"
    assert {cid for _, cid in runs} == {f"k{i:03d}" for i in range(n)}


# -- the `conserve batch` client ---------------------------------------------------------------------
def test_batch_client_writes_results(server, tmp_path, capsys):
    src = tmp_path / "job.jsonl"
    src.write_bytes(jsonl([line("x1"), line("x2", max_tokens=-1), line("x3")]))
    assert batch_main(["batch", str(src), "--url", server, "--poll", "0.05"]) == 0
    out = [json.loads(x) for x in (tmp_path / "job.output.jsonl").read_text().splitlines()]
    err = [json.loads(x) for x in (tmp_path / "job.errors.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in out] == ["x1", "x3"] and [e["custom_id"] for e in err] == ["x2"]
    stderr = capsys.readouterr().err
    assert "completed: 2 succeeded, 1 failed of 3" in stderr and "completed: 3/3 done" in stderr

    dup = tmp_path / "dup.jsonl"
    dup.write_bytes(jsonl([line("a"), line("a")]))
    assert batch_main(["batch", str(dup), "--url", server, "--poll", "0.05", "--output", str(tmp_path / "o")]) == 1
    assert "failed" in capsys.readouterr().err.splitlines()[-1]
    assert batch_main(["batch", str(src), "--url", "http://127.0.0.1:9", "--poll", "0.05"]) == 2


def test_batch_client_ctrl_c_cancels(tmp_path):
    with serve(build_app(tmp_path / "data", max_concurrency=1)) as url:
        src = tmp_path / "slow.jsonl"
        src.write_bytes(jsonl([line(f"s{i}", sleep=0.1) for i in range(50)]))
        code = "import sys; from conserve.batch_client import main; sys.exit(main(sys.argv[1:]))"
        proc = subprocess.Popen([sys.executable, "-c", code, "batch", str(src), "--url", url, "--poll", "0.05"],
                                stderr=subprocess.PIPE, text=True)
        client = client_for(url)
        deadline = time.monotonic() + 20
        while not (batches := client.batches.list().data) or batches[0].request_counts.completed < 1:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 130, stderr
        assert "being cancelled" in stderr
        assert wait_done(client, batches[0].id).status == "cancelled"
