"""Admission control over real HTTP: a burst far beyond --max-waiting-requests gets 429s with
Retry-After and OpenAI error objects while the admitted requests complete; the predicted-TTFT bound
turns online requests away; batch lines bypass the limits."""

from __future__ import annotations

import io
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")

from server_util import Server  # noqa: E402

pytestmark = pytest.mark.slow

# Long prompts prefilled 32 tokens per iteration (a fixed budget: --scheduler priority): each request
# waits for its first token for many iterations, so a burst finds the waiting slots taken.
LONG_PROMPT = [100 + i % 500 for i in range(480)]
BURST = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server("--dtype", "float32", "--kv-cache-gb", "0.25", "--max-model-len", "2048",
               "--scheduler", "priority",
               "--max-num-batched-tokens", "32", "--max-waiting-requests", "2", "--max-waiting-flex-requests", "1",
               "--max-predicted-ttft-factor", "0", data_dir=str(tmp_path_factory.mktemp("data"))).wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def fire(client, n: int, flex: bool = False) -> list:
    model = client.models.list().data[0].id
    extra = {"ignore_eos": True, **({"service_tier": "flex"} if flex else {})}

    def one(_):
        try:
            return client.completions.create(model=model, prompt=LONG_PROMPT, max_tokens=4, temperature=0,
                                             extra_body=extra)
        except openai.APIStatusError as e:
            return e

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def check_burst(results: list, limit: int) -> None:
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    served = [r for r in results if not isinstance(r, openai.APIStatusError)]
    assert refused and len(served) >= limit, results
    for e in refused:
        assert isinstance(e, openai.RateLimitError) and e.status_code == 429
        assert int(e.response.headers["retry-after"]) >= 1
        assert e.body["type"] == "rate_limit_error" and e.body["code"] == "queue_full"
        assert set(e.body) == {"message", "type", "param", "code"}
    for r in served:  # admitted requests are served in full
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4


def rejected(server, cls: str, reason: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    m = re.search(rf'^conserve_rejected_requests_total\{{reason="{reason}",request_class="{cls}"\}} (\S+)$', text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_online_burst_beyond_the_limit_gets_429(server, client):
    results = fire(client, BURST)
    check_burst(results, 2)
    refused = sum(isinstance(r, openai.APIStatusError) for r in results)
    assert rejected(server, "online", "queue_full") == refused
    # Once the burst is over the queue is empty again: a request goes through.
    assert client.completions.create(model=client.models.list().data[0].id, prompt="The sea is",
                                    max_tokens=2).usage.completion_tokens == 2


def test_flex_burst_beyond_its_own_limit_gets_429(server, client):
    results = fire(client, 8, flex=True)
    check_burst(results, 1)
    assert rejected(server, "offline", "queue_full") == sum(isinstance(r, openai.APIStatusError) for r in results)


def test_streams_are_refused_before_they_start(server, client):
    """A refused stream is a plain 429 response, not a 200 with an in-band error."""
    def stream(_):
        r = httpx.post(f"{server.url}/v1/completions", timeout=120,
                       json={"prompt": LONG_PROMPT, "max_tokens": 3, "stream": True, "ignore_eos": True})
        return r.status_code, r.headers.get("retry-after"), r.text

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(stream, range(8)))
    codes = sorted(code for code, _, _ in answers)
    assert set(codes) == {200, 429}
    for code, retry_after, text in answers:
        if code == 429:
            assert int(retry_after) >= 1 and json.loads(text)["error"]["type"] == "rate_limit_error"
        else:
            assert text.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in text


def test_batch_lines_bypass_the_limits(server, client):
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": LONG_PROMPT[:100], "max_tokens": 2, "temperature": 0}} for i in range(6)]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    file_id = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 300
    while batch.status not in ("completed", "failed", "expired", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.3)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 6 and batch.request_counts.failed == 0


def test_predicted_ttft_bound(tmp_path):
    """With a 1 ms TTFT objective every online prompt waiting behind another is predicted to miss it:
    a burst gets 429 predicted_ttft (the first, alone, is served); flex requests are not held to it."""
    s = Server("--dtype", "float32", "--kv-cache-gb", "0.25", "--max-model-len", "1024", "--slo-ttft-ms", "1",
               "--max-predicted-ttft-factor", "2", data_dir=str(tmp_path)).wait_ready()
    try:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0)
        results = fire(client, 6)
        refused = [r for r in results if isinstance(r, openai.APIStatusError)]
        assert refused and len(refused) < len(results)
        for e in refused:
            assert isinstance(e, openai.RateLimitError) and e.body["code"] == "predicted_ttft"
            assert int(e.response.headers["retry-after"]) >= 1
        assert rejected(s, "online", "predicted_ttft") == len(refused)
        flex = fire(client, 3, flex=True)
        assert not any(isinstance(r, openai.APIStatusError) for r in flex)
    finally:
        s.stop()
