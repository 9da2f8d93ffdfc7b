"""The dashboard: /metrics.json is the /metrics registry as JSON, the page is self-contained, and in a
real headless Chromium (Playwright) the page shows live numbers that move under online and batch load.

The browser test skips when Playwright or a Chromium binary is missing. CONSERVE_DASHBOARD_SCREENSHOT=
PATH saves a screenshot of the page under load (the README's)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from conserve.server import dashboard
from conserve.server.metrics import Metrics

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


def test_metrics_json_is_the_registry_as_json():
    metrics = Metrics()
    metrics.requests.labels("online", "stop").inc(3)
    metrics.ttft.labels("online").observe(0.03)
    metrics.kv_used.set(7)
    app = FastAPI()
    app.include_router(dashboard.router(metrics, "m", {"ttft_s": 1.0, "tbt_s": 0.1},
                                        lambda: [{"id": "batch_1", "progress": 0.5}]))
    with TestClient(app) as client:
        state = client.get("/metrics.json").json()
        page = client.get("/dashboard")
    m = state["metrics"]
    assert state["objectives"] == {"ttft_s": 1.0, "tbt_s": 0.1} and state["batches"][0]["id"] == "batch_1"
    assert m["conserve_requests"]["samples"] == [{"labels": {"request_class": "online", "finish_reason": "stop"},
                                                  "value": 3.0}]
    assert m["conserve_kv_blocks_used"]["samples"][0]["value"] == 7
    hist = m["conserve_time_to_first_token_seconds"]["samples"][0]
    assert hist["count"] == 1 and hist["buckets"][-1] == [None, 1.0]
    assert [b for b in hist["buckets"] if b[0] == 0.04] == [[0.04, 1.0]]
    # Every metric /metrics renders is in the JSON view: one set of metrics, two renderings.
    families = {re.sub("_total$", "", name) if kind == "counter" else name
                for name, kind in re.findall(r"^# TYPE (\S+) (\S+)", metrics.render().decode(), re.MULTILINE)
                if not name.endswith("_created")}  # counters' creation times: not metrics of their own
    assert families == set(m)
    # The page is self-contained: it fetches nothing but /metrics.json.
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://|<script\s+src|<link", page.text)
    assert re.findall(r"fetch\(\"([^\"]+)\"", page.text) == ["/metrics.json"]


# -- in a real browser -----------------------------------------------------------------------------
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium binary (apt-get install chromium)")


CHAT = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.mark.slow
def test_dashboard_shows_live_numbers_that_move_in_a_browser(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    openai = pytest.importorskip("openai")
    browser_path = chromium()
    from server_util import Server

    server = Server("--dtype", "float32", "--kv-cache-gb", "0.25", "--max-model-len", "1024",
                    data_dir=str(tmp_path / "data")).wait_ready()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    model = client.models.list().data[0].id
    stop = threading.Event()

    def chats():
        while not stop.is_set():
            try:
                client.chat.completions.create(model=model, messages=CHAT, max_tokens=8,
                                               extra_body={"ignore_eos": True})
            except openai.APIError:  # the server stopping under the last one
                return
            stop.wait(0.3)  # room for the batch between chats: both rates move within seconds

    def text(page, selector: str) -> str:
        return page.inner_text(selector).strip()

    def number(page, selector: str) -> float | None:
        value = text(page, selector)
        return None if value == "—" else float(value)

    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{server.url}/dashboard")
            page.wait_for_function("document.getElementById('updated').textContent !== '—'", timeout=10_000)
            lines = "".join(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
                                        "body": {"messages": CHAT, "max_tokens": 16, "ignore_eos": True}}) + "\n"
                            for i in range(6))
            upload = client.files.create(file=("in.jsonl", io.BytesIO(lines.encode())), purpose="batch")
            batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                          completion_window="30m")
            worker = threading.Thread(target=chats, daemon=True)
            worker.start()
            row = f"tr[data-batch='{batch.id}']"
            page.wait_for_selector(row, timeout=10_000)
            seen: dict[str, set] = {"updated": set(), "online": set(), "offline": set(), "progress": set()}
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                seen["updated"].add(text(page, "#updated"))
                seen["online"].add(number(page, "#online-tps"))
                seen["offline"].add(number(page, "#offline-tps"))
                seen["progress"].add(text(page, f"{row} .progress"))
                ttft = text(page, "#ttft-p50")
                if any(seen["online"] - {None, 0.0}) and ttft != "—":
                    stop.set()  # online seen: let the batch have the machine (a busy one starves it)
                if (len(seen["updated"]) >= 3 and any(seen["online"] - {None, 0.0})
                        and any(seen["offline"] - {None, 0.0}) and len(seen["progress"]) >= 2 and ttft != "—"):
                    break
                time.sleep(0.5)
            shot = os.environ.get("CONSERVE_DASHBOARD_SCREENSHOT")
            if shot:
                page.screenshot(path=shot, full_page=True)
            status = client.batches.retrieve(batch.id).status
            browser.close()
        # The clock ticks, both rates were live and non-zero, the batch's progress bar moved, and
        # the TTFT tile shows a latency.
        assert len(seen["updated"]) >= 3
        assert any(seen["online"] - {None, 0.0}) and any(seen["offline"] - {None, 0.0}), seen
        assert len(seen["progress"]) >= 2 or status == "completed", seen
        assert re.fullmatch(r"\d+ ms|\d+\.\d\d s", ttft)
    finally:
        stop.set()
        server.stop()
