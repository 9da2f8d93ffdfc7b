"""Engine faults over real HTTP: a `conserve serve` whose steps raise on demand (faulty_serve.py).
A single fault fails the request in flight with 503, the engine is rebuilt and serves again; a fault
on every step backs off, gives up after --max-engine-restarts, and the server answers 503 without hanging."""

from __future__ import annotations

import json
import os
import re
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from server_util import Server  # noqa: E402

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
SCRIPT = os.path.join(os.path.dirname(__file__), "faulty_serve.py")
ARGS = ("--dtype", "float32", "--kv-cache-gb", "0.25", "--max-model-len", "1024")


def start(tmp_path, faults: str, *args: str) -> tuple[Server, object]:
    server = Server(*ARGS, *args, data_dir=str(tmp_path), script=SCRIPT,
                    env={"CONSERVE_TEST_FAULTS": faults}).wait_ready()
    return server, openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def wait_healthy(server: Server, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{server.url}/health").status_code == 200:
            return
        time.sleep(0.2)
    raise TimeoutError(open(server.log_path).read())


def rejected(server: Server, reason: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    m = re.search(rf'^conserve_rejected_requests_total\{{reason="{reason}",request_class="online"\}} (\S+)$', text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_a_single_fault_fails_the_request_in_flight_then_the_engine_restarts(tmp_path):
    # Step 3 raises once; the backoff (3 s) keeps the engine down long enough to look at it.
    server, client = start(tmp_path, "3", "--engine-restart-backoff-s", "3")
    try:
        model = client.models.list().data[0].id
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model=model, messages=CHAT, max_tokens=20, temperature=0)
        assert e.value.status_code == 503 and e.value.body["type"] == "server_error"
        # While it restarts: health and new requests answer 503 with Retry-After.
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and int(health.headers["retry-after"]) >= 1
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model=model, messages=CHAT, max_tokens=2)
        assert e.value.status_code == 503 and int(e.value.response.headers["retry-after"]) >= 1
        assert "restarting" in e.value.message
        wait_healthy(server)
        ok = client.chat.completions.create(model=model, messages=CHAT, max_tokens=20, temperature=0)
        assert "Paris" in ok.choices[0].message.content
        assert rejected(server, "engine_restarting") == 1
        log = open(server.log_path).read()
        assert log.count("restart 1 of at most 5") == 1 and "engine restarted" in log
    finally:
        server.stop()


def test_a_fault_on_every_step_backs_off_then_gives_up(tmp_path):
    server, client = start(tmp_path, "1+", "--engine-restart-backoff-s", "0.05", "--max-engine-restarts", "2")
    try:
        model = client.models.list().data[0].id
        with pytest.raises(openai.InternalServerError):  # fault 1: restart 1
            client.chat.completions.create(model=model, messages=CHAT, max_tokens=5)
        wait_healthy(server)
        # Fault 2, on a stream: the error comes in-band, then [DONE]; restart 2.
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                          json={"messages": CHAT, "max_tokens": 5, "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "injected fault" in error["message"]
        wait_healthy(server)
        with pytest.raises(openai.InternalServerError):  # fault 3: the second restart failed too
            client.chat.completions.create(model=model, messages=CHAT, max_tokens=5)
        # Given up: health stays 503, requests answer 503 at once (no Retry-After: nothing to wait for).
        deadline = time.monotonic() + 30
        while "not restarting again" not in open(server.log_path).read() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = open(server.log_path).read()
        assert "failed 3 times in a row" in log and "not restarting again" in log
        assert log.count("restart 1 of at most 2") == 1 and log.count("restart 2 of at most 2") == 1
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and "dead" in health.json()["error"]["message"]
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model=model, messages=CHAT, max_tokens=5, timeout=30)
        assert e.value.status_code == 503 and "retry-after" not in e.value.response.headers
        assert rejected(server, "engine_dead") == 1
        assert server.proc.poll() is None  # the server itself stays up, reporting the failure
    finally:
        server.stop()
