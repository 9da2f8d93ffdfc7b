"""The HTTP server end to end: a real `conserve serve` process driven by the official openai client."""

from __future__ import annotations

import re
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from server_util import Server  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "test-key"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server("--dtype", "float32", "--kv-cache-gb", "0.25", "--max-model-len", "2048",
               data_dir=str(tmp_path_factory.mktemp("data")), api_key=KEY).wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def kv_blocks_used(server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return float(re.search(r"^conserve_kv_blocks_used (\S+)$", text, re.M).group(1))


def test_chat_plain_and_streamed_agree(client, model):
    plain = client.chat.completions.create(model=model, messages=CHAT, temperature=0, max_tokens=20)
    assert plain.object == "chat.completion" and "Paris" in plain.choices[0].message.content
    assert plain.usage.completion_tokens == 20 or plain.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=model, messages=CHAT, temperature=0, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens and chunks[-1].choices == []
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]


def test_completions_with_several_prompts_n_and_logprobs(client, model):
    res = client.completions.create(model=model, prompt=["The sea is", "Once upon a time"], n=2, max_tokens=5,
                                    temperature=0.8, seed=5, logprobs=2)
    assert sorted(c.index for c in res.choices) == [0, 1, 2, 3]
    for c in res.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) <= 5
        assert all(len(top) <= 2 for top in c.logprobs.top_logprobs)
    assert res.usage.prompt_tokens > 0 and res.usage.completion_tokens <= 20


def test_chat_logprobs_seed_stop_and_flex(client, model):
    kw = dict(model=model, messages=CHAT, max_tokens=12, temperature=1.0, seed=11)
    a = client.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
    b = client.chat.completions.create(**kw, service_tier="flex")
    assert a.choices[0].message.content == b.choices[0].message.content  # same seed, either class
    content = a.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 for t in content)
    assert b.service_tier == "flex"
    greedy = client.chat.completions.create(model=model, messages=CHAT, temperature=0, max_tokens=20)
    word = greedy.choices[0].message.content.split()[2]
    cut = client.chat.completions.create(model=model, messages=CHAT, temperature=0, max_tokens=20, stop=[word])
    assert cut.choices[0].finish_reason == "stop" and word not in cut.choices[0].message.content


def test_errors_use_openai_error_objects(client, model, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=model, messages=CHAT, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=model, prompt=[1] * 3000, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=model, prompt="hi", max_tokens=5000)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    raw = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json",
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    wrong_type = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": "hello", "n": "many"},
                            headers={"Authorization": f"Bearer {KEY}"})
    assert wrong_type.status_code == 400 and "messages" in wrong_type.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_request_chat_templates_are_refused_by_default(client, model):
    with pytest.raises(openai.BadRequestError, match="--trust-request-chat-template") as e:
        client.chat.completions.create(model=model, messages=CHAT, max_tokens=2,
                                       extra_body={"chat_template": "{{ messages[0].content }}"})
    assert e.value.body["param"] == "chat_template" and e.value.body["type"] == "invalid_request_error"


def test_client_disconnect_mid_stream_aborts_and_frees_blocks(client, model, server):
    stream = client.chat.completions.create(model=model, messages=CHAT, max_tokens=1000, stream=True,
                                            extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert kv_blocks_used(server) > 0
    stream.close()
    deadline = time.monotonic() + 10
    while kv_blocks_used(server) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kv_blocks_used(server) == 0


@pytest.mark.parametrize("finish", ["length", "disconnect"])
def test_flex_blocks_free_once_idle(client, model, server, finish):
    # Offline requests' blocks wait for their host checkpoint copies to land; once the engine is
    # idle those copies settle and the gauge must come back to 0, not keep the last step's count.
    stream = client.chat.completions.create(model=model, messages=CHAT, max_tokens=40, stream=True,
                                            service_tier="flex", extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if finish == "disconnect" and i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while kv_blocks_used(server) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kv_blocks_used(server) == 0


def test_metrics_report_classes(server, client, model):
    client.chat.completions.create(model=model, messages=CHAT, max_tokens=2, service_tier="flex")
    text = httpx.get(f"{server.url}/metrics").text
    assert 'conserve_requests_total{finish_reason="length",request_class="offline"}' in text
    assert "conserve_time_to_first_token_seconds_bucket" in text
    for name in ('conserve_preemptions_total{cause="memory"}', 'conserve_preemptions_total{cause="layer"}',
                 "conserve_kv_checkpointed_bytes_total", "conserve_preemption_latency_seconds_bucket",
                 "conserve_recomputed_tokens_total", "conserve_host_kv_blocks_used",
                 "conserve_resumed_iterations_total", "conserve_offline_time_fraction"):
        assert name in text
    # The harvest: the flex request's prompt and output positions were computed as offline work.
    offline = float(re.search(r'^conserve_computed_tokens_total\{request_class="offline"\} (\S+)$', text, re.M).group(1))
    assert offline >= 2
    assert float(re.search(r"^conserve_offline_tokens_per_second (\S+)$", text, re.M).group(1)) > 0
    assert float(re.search(r"^conserve_offline_time_fraction (\S+)$", text, re.M).group(1)) > 0
    # What offline work may fill an online iteration to: the TBT objective over the error tail (or less
    # the fixed margin while too few co-served iterations were measured).
    assert float(re.search(r"^conserve_tbt_fill_limit_seconds (\S+)$", text, re.M).group(1)) > 0
