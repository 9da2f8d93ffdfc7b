"""OpenAI request schemas (with vLLM's sampling extras) and their translation to SamplingParams."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from conserve.errors import RequestError
from conserve.request import RequestClass
from conserve.sampling_params import SamplingParams
from conserve.server.errors import APIError

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    # Unknown fields are ignored (as vLLM does); known fields are type-checked.
    model_config = ConfigDict(extra="ignore")

    # Ranges are OpenAI's (its OpenAPI spec); out of range is a 400 naming the parameter. Fields the spec
    # marks nullable accept null, meaning the default.
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(1, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    user: str | None = None
    service_tier: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @property
    def request_class(self) -> RequestClass:
        return RequestClass.OFFLINE if self.service_tier == "flex" else RequestClass.ONLINE

    def _check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by this server (only 0)", name)
        if self.service_tier not in (None, "auto", "default", "flex"):
            raise APIError(400, f"service_tier must be auto, default or flex, got {self.service_tier!r}",
                           "service_tier")
        if self.choices > 16:
            raise APIError(400, "n must be at most 16 on this server", "n")

    @property
    def choices(self) -> int:
        return 1 if self.n is None else self.n

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        self._check_unsupported()
        top_p, top_k = 1.0 if self.top_p is None else self.top_p, self.top_k or 0
        if top_p == 0:  # OpenAI allows it: the nucleus is the single most likely token
            top_p, top_k = 1.0, 1
        try:
            return SamplingParams(
                n=self.choices, temperature=1.0 if self.temperature is None else self.temperature,
                top_p=top_p, top_k=top_k,
                min_p=self.min_p or 0.0, seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens,
                stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
                stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos, logprobs=logprobs,
                include_stop_str_in_output=self.include_stop_str_in_output,
                skip_special_tokens=self.skip_special_tokens)
        except RequestError as e:
            raise APIError(400, str(e)) from None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"only text content parts are supported, got {part.get('type')!r}",
                               "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    chat_template: str | None = None

    def to_params(self, max_tokens: int | None) -> SamplingParams:
        if self.tools:
            raise APIError(400, "tools are not supported by this server", "tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise APIError(400, "only response_format type 'text' is supported", "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", "top_logprobs")
        return self.sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict[str, Any]]:
        out = []
        for m in self.messages:
            message = {"role": m.role, "content": m.text()}
            if m.name:
                message["name"] = m.name
            out.append(message)
        return out


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=0, le=20)

    def to_params(self, max_tokens: int | None) -> SamplingParams:
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", "suffix")
        if self.best_of not in (None, self.choices):
            raise APIError(400, "best_of is not supported by this server", "best_of")
        return self.sampling_params(max_tokens, self.logprobs)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

