"""Batch jobs on the real server and model: results match online greedy answers, and a server
killed with SIGKILL mid-batch resumes on restart with every line exactly once."""

from __future__ import annotations

import io
import json
import signal
import time

import pytest

openai = pytest.importorskip("openai")

from server_util import Server  # noqa: E402

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name a colour.", "Say hello.", "Count to three.",
             "What is 2 + 2?", "Name a fruit."]


def batch_lines(n: int) -> list[dict]:
    # Different lengths, so lines finish one after another rather than all at once.
    return [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                      "max_tokens": 4 + 2 * i, "temperature": 0, "ignore_eos": True}} for i in range(n)]


def upload(client, lines: list[dict], extra: bytes = b"") -> str:
    data = "".join(json.dumps(x) + "\n" for x in lines).encode() + extra
    return client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch").id


def wait(client, batch_id: str, until, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        time.sleep(0.2)
    raise TimeoutError(client.batches.retrieve(batch_id))


def results(client, file_id: str) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def ask_online(client, result: dict, line: dict):
    body = {k: v for k, v in line["body"].items() if k != "ignore_eos"}
    return client.chat.completions.create(model=result["response"]["body"]["model"], **body,
                                          extra_body={"ignore_eos": True})


def start(data_dir) -> tuple[Server, object]:
    server = Server("--dtype", "float32", "--kv-cache-gb", "0.25", "--max-model-len", "1024",
                    data_dir=str(data_dir)).wait_ready()
    return server, openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def test_batch_results_match_online_answers_and_bad_lines_go_to_errors(tmp_path):
    server, client = start(tmp_path)
    try:
        lines = batch_lines(6)
        file_id = upload(client, lines, extra=b"{not json}\n")
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        done = wait(client, batch.id, lambda b: b.status in ("completed", "failed"))
        assert done.status == "completed"
        assert (done.request_counts.completed, done.request_counts.failed) == (6, 1)
        out = results(client, done.output_file_id)
        assert [r["custom_id"] for r in out] == [x["custom_id"] for x in lines]
        for line, res in zip(lines, out):
            online = ask_online(client, res, line)
            assert res["response"]["status_code"] == 200
            assert res["response"]["body"]["choices"][0]["message"]["content"] == online.choices[0].message.content
            assert res["response"]["body"]["service_tier"] == "flex"
        errors = results(client, done.error_file_id)
        assert len(errors) == 1 and errors[0]["error"]["code"] == "invalid_json"
    finally:
        server.stop()


def test_sigkill_mid_batch_resumes_with_every_line_once(tmp_path):
    lines = batch_lines(24)
    server, client = start(tmp_path)
    try:
        batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                      completion_window="24h")
        partial = wait(client, batch.id, lambda b: b.request_counts.completed >= 3)
        assert partial.request_counts.completed < len(lines), "finished before it could be killed"
    finally:
        server.stop(signal.SIGKILL)
    server, client = start(tmp_path)
    try:
        done = wait(client, batch.id, lambda b: b.status in ("completed", "failed"))
        assert done.status == "completed" and done.request_counts.completed == len(lines)
        out = results(client, done.output_file_id)
        assert [r["custom_id"] for r in out] == [x["custom_id"] for x in lines]  # each exactly once
        for line, res in list(zip(lines, out))[::5]:
            online = ask_online(client, res, line)
            assert res["response"]["body"]["choices"][0]["message"]["content"] == online.choices[0].message.content
    finally:
        server.stop()
