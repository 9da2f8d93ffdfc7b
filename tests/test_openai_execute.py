"""OpenAIServing.execute (one batch line) without a model: an engine fault is raised for the batch
runner to handle, never turned into an answer; a request chat template needs the server's consent."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from conserve.async_engine import EngineDeadError
from conserve.errors import RequestError
from conserve.server.metrics import Metrics
from conserve.server.openai_api import OpenAIServing


class FakeEngine:
    """What OpenAIServing needs of an AsyncEngine; generate raises `error`."""

    def __init__(self, error: Exception) -> None:
        tokenizer = SimpleNamespace(chat_templates={"default": "{{ messages[0].content }}"})
        self.engine = SimpleNamespace(tokenizer=tokenizer, max_model_len=64, latency_model=None,
                                      config=SimpleNamespace(max_num_batched_tokens=64))
        self.prompt_limits = SimpleNamespace(validate=lambda ids: None)
        self.error = error

    async def generate(self, *args, **kw):
        raise self.error
        yield  # an async generator, like AsyncEngine.generate


def run(serving: OpenAIServing, endpoint: str, body: dict):
    async def main():
        try:
            return await serving.execute(endpoint, body)
        finally:
            await serving.aclose()
    return asyncio.run(main())


def test_execute_raises_engine_faults_and_answers_request_errors():
    body = {"prompt": [1, 2, 3], "max_tokens": 2}
    with pytest.raises(EngineDeadError, match="boom"):
        run(OpenAIServing(FakeEngine(EngineDeadError("boom")), "m", Metrics()), "/v1/completions", body)
    status, answer = run(OpenAIServing(FakeEngine(RequestError("bad stop")), "m", Metrics()), "/v1/completions",
                         body)
    assert status == 400 and answer["error"]["message"] == "bad stop"


def test_request_chat_template_is_refused_without_the_flag():
    serving = OpenAIServing(FakeEngine(EngineDeadError("unused")), "m", Metrics())
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ 'x' }}"}
    status, answer = run(serving, "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == "chat_template"
    assert "--trust-request-chat-template" in answer["error"]["message"]
