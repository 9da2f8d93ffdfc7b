"""Chat templates that requests bring, on a real server started with --trust-request-chat-template:
rendered in the sandbox, and a runaway template is cut off with a 400 while the server keeps answering."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from conserve.tokenizer import Tokenizer  # noqa: E402
from server_util import Server  # noqa: E402

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
LOOPS_FOREVER = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server("--dtype", "float32", "--kv-cache-gb", "0.25", "--max-model-len", "1024",
               "--trust-request-chat-template", "--request-chat-template-timeout", "4",
               data_dir=str(tmp_path_factory.mktemp("data"))).wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)


def ask(client, template: str | None = None, messages=CHAT):
    extra = {"chat_template": template} if template is not None else None
    return client.chat.completions.create(model=client.models.list().data[0].id, messages=messages,
                                          temperature=0, max_tokens=4, extra_body=extra)


def test_a_request_template_is_what_renders_the_prompt(client, gguf_path):
    tok = Tokenizer.from_gguf(gguf_path)
    own = ask(client, tok.chat_template)  # the model's own template, sent as text
    plain = ask(client)
    assert own.choices[0].message.content == plain.choices[0].message.content
    assert own.usage.prompt_tokens == plain.usage.prompt_tokens
    bare = ask(client, "{{ messages[0].content }}")
    assert bare.usage.prompt_tokens == len(tok.encode(CHAT[0]["content"], add_special_tokens=False))


def test_template_errors_and_limits_are_400s(client):
    with pytest.raises(openai.BadRequestError, match="Range too big"):
        ask(client, "{% for i in range(10**6) %}x{% endfor %}")
    with pytest.raises(openai.BadRequestError, match="memory limit"):
        ask(client, "{{ 'x' * 10**10 }}")
    with pytest.raises(openai.BadRequestError, match="chat template error"):
        ask(client, "{% for %}")
    assert ask(client, "{{ messages[0].content }}").usage.prompt_tokens > 0  # workers were replaced


def test_a_runaway_template_is_cut_off_while_the_server_keeps_answering(client, server):
    done: list[str] = []
    errors: list[Exception] = []

    def bad() -> None:
        try:
            ask(client, LOOPS_FOREVER)
        except openai.BadRequestError as e:
            errors.append(e)
        done.append("bad")

    thread = threading.Thread(target=bad)
    thread.start()
    try:
        time.sleep(1)  # let the bad request reach the sandbox (it then runs for the 4 s limit)
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
        done.append("health")
        assert client.models.list().data
        done.append("models")
    finally:
        thread.join(60)
    # The event loop answered while the template ran; the template was cut off at its limit.
    assert done == ["health", "models", "bad"]
    assert len(errors) == 1 and "did not finish within 4 s" in str(errors[0])
    assert ask(client).choices[0].message.content  # and generation still works
