"""Every kind of response a real `conserve serve` sends validates against OpenAI's official OpenAPI
component schemas (models, chat, chat chunks, completions, completion chunks, errors, files, batches),
and request parameters outside OpenAI's ranges get a 400 error object naming the parameter."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

pytest.importorskip("jsonschema_rs")

from openai_schema import assert_valid, errors, source  # noqa: E402
from server_util import Server  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "schema-key"
CHAT = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server("--dtype", "float32", "--kv-cache-gb", "0.05", "--max-model-len", "128",
               data_dir=str(tmp_path_factory.mktemp("schema")), api_key=KEY).wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=f"{server.url}/v1", headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(http):
    return http.get("/models").json()["data"][0]["id"]


def ok(response: httpx.Response, schema: str) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()
    assert_valid(schema, body)
    return body


def error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert_valid("ErrorResponse", body)
    return body["error"]


def sse(http: httpx.Client, path: str, body: dict) -> list[dict]:
    """The JSON events of one streamed response, up to [DONE]."""
    events, done = [], False
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            events.append(json.loads(line[len("data: "):]))
    assert done and events
    return events


def test_schemas_record_their_source():
    src = source()
    assert src["repository"] == "https://github.com/openai/openai-openapi" and src["license"] == "MIT"
    assert re.fullmatch(r"[0-9a-f]{40}", src["commit"])


def test_schema_check_rejects_shapes_this_server_used_to_send():
    """The validator is not vacuous: each shape fixed for this test is refused, its fix accepted."""
    head = {"id": "x", "created": 1, "model": "m"}
    message = {"role": "assistant", "content": "hi"}
    chat = {**head, "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}]}
    assert errors("CreateChatCompletionResponse", chat)
    message["refusal"] = None
    assert not errors("CreateChatCompletionResponse", chat)
    choice = {"index": 0, "delta": {}, "finish_reason": None, "logprobs": {"content": []}}
    assert errors("CreateChatCompletionStreamResponse", {**head, "object": "chat.completion.chunk",
                                                         "choices": [choice]})
    completion_chunk = {**head, "object": "text_completion", "usage": None,
                        "choices": [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None}]}
    assert errors("CompletionChunk", completion_chunk)
    del completion_chunk["usage"]
    assert not errors("CompletionChunk", completion_chunk)
    assert errors("CreateCompletionResponse", completion_chunk)  # a whole response must say why it ended
    file = {"id": "f", "object": "file", "bytes": 1, "created_at": 1, "filename": "a", "purpose": "batch",
            "status": "processed"}
    assert not errors("OpenAIFile", file) and errors("OpenAIFile", {**file, "expires_at": None})
    batch = {"id": "b", "object": "batch", "endpoint": "/v1/completions", "input_file_id": "f",
             "completion_window": "24h", "status": "completed", "created_at": 1, "metadata": None}
    assert not errors("Batch", batch) and errors("Batch", {**batch, "errors": None})
    assert errors("ListFilesResponse", {"object": "list", "data": [], "first_id": None, "last_id": None,
                                        "has_more": False})


def test_models(http, model):
    ok(http.get("/models"), "ListModelsResponse")
    assert ok(http.get(f"/models/{model}"), "Model")["id"] == model
    assert error(http.get("/models/no-such-model"), 404)["code"] == "model_not_found"


@pytest.mark.parametrize("logprobs,n", [(False, 1), (True, 2)])
def test_chat(http, model, logprobs, n):
    body = {"model": model, "messages": CHAT, "max_tokens": 3, "n": n}
    if logprobs:
        body.update(logprobs=True, top_logprobs=2)
    res = ok(http.post("/chat/completions", json=body), "CreateChatCompletionResponse")
    assert sorted(c["index"] for c in res["choices"]) == list(range(n))
    for c in res["choices"]:
        assert c["message"]["refusal"] is None and c["message"]["content"]
        if logprobs:
            assert c["logprobs"]["content"] and c["logprobs"]["refusal"] is None
            assert all(len(t["top_logprobs"]) == 2 for t in c["logprobs"]["content"])
        else:
            assert c["logprobs"] is None


@pytest.mark.parametrize("logprobs,n,usage", [(False, 1, False), (True, 2, True)])
def test_chat_stream(http, model, logprobs, n, usage):
    body = {"model": model, "messages": CHAT, "max_tokens": 3, "n": n}
    if logprobs:
        body.update(logprobs=True, top_logprobs=1)
    if usage:
        body["stream_options"] = {"include_usage": True}
    events = sse(http, "/chat/completions", body)
    for e in events:
        assert_valid("CreateChatCompletionStreamResponse", e)
    text, tokens, finished = {}, {}, {}
    for e in events:
        for c in e["choices"]:
            text[c["index"]] = text.get(c["index"], "") + (c["delta"].get("content") or "")
            tokens[c["index"]] = tokens.get(c["index"], 0) + len((c.get("logprobs") or {}).get("content") or [])
            if c["finish_reason"]:
                finished[c["index"]] = c["finish_reason"]
    assert sorted(finished) == list(range(n)) and all(text.values())
    assert all(tokens[i] > 0 for i in range(n)) if logprobs else not any(tokens.values())
    if usage:
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("logprobs,n,echo", [(None, 1, False), (2, 2, True)])
def test_completion(http, model, logprobs, n, echo):
    body = {"model": model, "prompt": ["The sea", "A cat"], "max_tokens": 3, "n": n, "echo": echo,
            "logprobs": logprobs}
    res = ok(http.post("/completions", json=body), "CreateCompletionResponse")
    assert sorted(c["index"] for c in res["choices"]) == list(range(2 * n))
    for c in res["choices"]:
        assert (c["logprobs"] is None) == (logprobs is None)


@pytest.mark.parametrize("logprobs,n,echo,usage", [(None, 1, False, False), (2, 2, True, True)])
def test_completion_stream(http, model, logprobs, n, echo, usage):
    body = {"model": model, "prompt": ["The sea", "A cat"], "max_tokens": 3, "n": n, "echo": echo,
            "logprobs": logprobs}
    if usage:
        body["stream_options"] = {"include_usage": True}
    events = sse(http, "/completions", body)
    for e in events:
        assert_valid("CompletionChunk", e)
    finished = {c["index"] for e in events for c in e["choices"] if c["finish_reason"]}
    assert finished == set(range(2 * n))
    with_lps = [c for e in events for c in e["choices"] if c["logprobs"] is not None]
    assert bool(with_lps) == (logprobs is not None)
    if usage:
        assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] > 0


def test_errors(server, http, model):
    err = error(httpx.get(f"{server.url}/v1/models"), 401)
    assert err["code"] == "invalid_api_key"
    assert error(http.post("/chat/completions", json={"model": "nope", "messages": CHAT}), 404)["param"] == "model"
    error(http.post("/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert error(http.post("/chat/completions", json={"model": model}), 400)["param"] == "messages"
    assert error(http.post("/chat/completions", json={"model": model, "messages": [{"content": "x"}]}),
                 400)["param"] == "messages[0].role"
    error(http.get("/no-such-route"), 404)
    long = {"model": model, "prompt": "hello " * 200, "max_tokens": 3}
    assert error(http.post("/completions", json=long), 400)["code"] == "context_length_exceeded"


OUT_OF_RANGE = [
    ("chat", "temperature", 2.01), ("chat", "temperature", -0.1), ("chat", "top_p", 1.5), ("chat", "top_p", -0.1),
    ("chat", "presence_penalty", 2.5), ("chat", "presence_penalty", -2.5), ("chat", "frequency_penalty", 3),
    ("chat", "frequency_penalty", -3), ("chat", "n", 0), ("chat", "top_logprobs", 21), ("chat", "top_logprobs", -1),
    ("chat", "seed", 2**63), ("completions", "logprobs", 6), ("completions", "logprobs", -1),
    ("completions", "temperature", 3), ("completions", "top_p", 2), ("completions", "n", 0),
    ("completions", "n", 129), ("completions", "best_of", 21), ("completions", "max_tokens", -1),
    ("completions", "presence_penalty", -2.1),
]


def _request(kind: str, model: str, **extra) -> tuple[str, dict]:
    if kind == "chat":
        return "/chat/completions", {"model": model, "messages": CHAT, "max_tokens": 2, **extra}
    return "/completions", {"model": model, "prompt": "Hi", "max_tokens": 2, **extra}


@pytest.mark.parametrize("kind,name,value", OUT_OF_RANGE)
def test_out_of_range_parameters_are_400(http, model, kind, name, value):
    extra = {name: value, **({"logprobs": True} if name == "top_logprobs" else {})}
    path, body = _request(kind, model, **extra)
    err = error(http.post(path, json=body), 400)
    assert err["param"] == name and err["type"] == "invalid_request_error", err


@pytest.mark.parametrize("kind,extra", [
    ("chat", {"temperature": 2, "top_p": 0, "presence_penalty": 0, "frequency_penalty": None, "n": None,
              "seed": -2**63, "stream": None}),
    ("chat", {"temperature": 0, "top_p": 1, "logprobs": True, "top_logprobs": 20}),
    ("completions", {"temperature": 0, "best_of": 1, "echo": None, "n": None, "logprobs": 0}),
    ("completions", {"logprobs": 5, "presence_penalty": None, "max_completion_tokens": 1}),
])
def test_in_range_and_null_parameters_are_accepted(http, model, kind, extra):
    path, body = _request(kind, model, **extra)
    ok(http.post(path, json=body), "CreateChatCompletionResponse" if kind == "chat" else "CreateCompletionResponse")


def test_top_p_zero_keeps_only_the_most_likely_token(http, model):
    path, body = _request("completions", model, max_tokens=4, seed=1)
    greedy = ok(http.post(path, json={**body, "temperature": 0}), "CreateCompletionResponse")
    nucleus = ok(http.post(path, json={**body, "temperature": 1.5, "top_p": 0}), "CreateCompletionResponse")
    assert nucleus["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_vllm_extras_stay_accepted(http, model):
    path, body = _request("chat", model, max_tokens=4, top_k=5, min_p=0.05, ignore_eos=True, min_tokens=4,
                          stop_token_ids=[0], skip_special_tokens=True, include_stop_str_in_output=False,
                          add_generation_prompt=True)  # chat_template: needs --trust-request-chat-template
    res = ok(http.post(path, json=body), "CreateChatCompletionResponse")
    assert res["usage"]["completion_tokens"] == 4  # ignore_eos and min_tokens: exactly max_tokens
    path, body = _request("completions", model, top_k=1, min_p=0.1, ignore_eos=True, min_tokens=2)
    ok(http.post(path, json=body), "CreateCompletionResponse")


# -- files and batches ---------------------------------------------------------------------------
def upload(http: httpx.Client, content: bytes, purpose: str = "batch") -> dict:
    return ok(http.post("/files", files={"file": ("in.jsonl", content, "application/jsonl")},
                        data={"purpose": purpose}), "OpenAIFile")


def wait_batch(http: httpx.Client, batch_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        b = ok(http.get(f"/batches/{batch_id}"), "Batch")
        if b["status"] in ("completed", "failed", "expired", "cancelled"):
            return b
        assert time.monotonic() < deadline, b
        time.sleep(0.1)


def batch_lines(model: str, count: int, max_tokens: int = 2) -> bytes:
    return "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": model, "messages": CHAT, "max_tokens": max_tokens}}) + "\n"
                   for i in range(count)).encode()


def test_files_and_batches(http, model):
    # Empty lists first (nothing else in this module makes batch outputs or batches).
    empty = ok(http.get("/files", params={"purpose": "batch_output"}), "ListFilesResponse")
    assert empty["data"] == [] and empty["has_more"] is False
    assert ok(http.get("/batches"), "ListBatchesResponse")["data"] == []

    f = upload(http, batch_lines(model, 2))
    assert ok(http.get(f"/files/{f['id']}"), "OpenAIFile")["id"] == f["id"]
    listed = ok(http.get("/files"), "ListFilesResponse")
    assert f["id"] in [x["id"] for x in listed["data"]]

    created = ok(http.post("/batches", json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                                             "completion_window": "24h", "metadata": {"k": "v"}}), "Batch")
    done = wait_batch(http, created["id"])
    assert done["status"] == "completed" and done["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    out = http.get(f"/files/{done['output_file_id']}/content")
    for line in out.text.splitlines():
        assert_valid("CreateChatCompletionResponse", json.loads(line)["response"]["body"])
    ok(http.get(f"/files/{done['output_file_id']}"), "OpenAIFile")

    failed = wait_batch(http, ok(http.post("/batches", json={
        "input_file_id": upload(http, b"\n")["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}), "Batch")["id"])
    assert failed["status"] == "failed" and failed["errors"]["data"][0]["code"] == "empty_file"

    slow = ok(http.post("/batches", json={"input_file_id": upload(http, batch_lines(model, 40, 30))["id"],
                                          "endpoint": "/v1/chat/completions", "completion_window": "24h"}), "Batch")
    cancel = http.post(f"/batches/{slow['id']}/cancel")
    if cancel.status_code == 200:  # usually: 40 lines take longer than the round trip
        assert_valid("Batch", cancel.json())
        assert wait_batch(http, slow["id"])["status"] == "cancelled"
    else:
        assert error(cancel, 409)["code"] == "batch_not_cancellable"

    listed = ok(http.get("/batches", params={"limit": 2}), "ListBatchesResponse")
    assert len(listed["data"]) == 2 and listed["has_more"] is True
    error(http.get("/batches/batch_nope"), 404)

    gone = ok(http.delete(f"/files/{f['id']}"), "DeleteFileResponse")
    assert gone == {"id": f["id"], "object": "file", "deleted": True}
    assert error(http.get(f"/files/{f['id']}"), 404)["code"] == "file_not_found"
