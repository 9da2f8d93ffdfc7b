"""The HTTP side: streamed OpenAI requests timed chunk by chunk, and the Files/Batches calls.

Plain httpx and server-sent events, so any OpenAI-compatible server works. A failed request becomes a
RequestResult with `error` set; only an unreachable server (BenchError) stops a benchmark.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field

import httpx

from conserve.errors import ConserveError


class BenchError(ConserveError):
    """The server cannot be used at all (unreachable, refused credentials): a one-line message."""


@dataclass
class RequestResult:
    """One streamed request. Times are time.perf_counter() seconds; a 'chunk' is an SSE event that
    carried generated text (a server may put several tokens in one)."""

    start: float
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None  # from usage
    completion_tokens: int | None = None  # from usage
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def output_tokens(self) -> int:
        """usage.completion_tokens, or the chunk count when the server sent no usage."""
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start if self.chunk_times else 0.0

    @property
    def e2el(self) -> float:
        return self.end - self.start

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.chunk_times)]

    @property
    def tpot(self) -> float | None:
        """(E2EL - TTFT) / (output tokens - 1), as vLLM; None with fewer than two tokens."""
        n = self.output_tokens
        return (self.e2el - self.ttft) / (n - 1) if n > 1 else None


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _error_text(status: int, body: bytes) -> str:
    text = body.decode("utf-8", errors="replace")
    try:
        text = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    return f"HTTP {status}: {' '.join(str(text).split())[:300]}"


def _chunk_text(event: dict, chat: bool) -> str:
    for choice in event.get("choices") or []:
        if chat:
            delta = choice.get("delta") or {}
            text = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
        else:
            text = choice.get("text")
        if text:
            return text
    return ""


class BenchClient:
    def __init__(self, base_url: str, api_key: str, timeout_s: float, max_connections: int) -> None:
        self.base_url = base_url.rstrip("/")
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers={"Authorization": f"Bearer {api_key}"},
                                       timeout=httpx.Timeout(timeout_s, connect=30.0), limits=limits)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def probe(self, model: str | None) -> str:
        """Check the server answers and return the model to use (the first listed when None)."""
        try:
            r = await self._http.get("/v1/models", timeout=15.0)
        except httpx.HTTPError as e:
            raise BenchError(f"cannot reach {self.base_url}: {_describe(e)}") from None
        if r.status_code in (401, 403):
            raise BenchError(f"{self.base_url} refused the API key ({_error_text(r.status_code, r.content)}); "
                             "pass --api-key")
        if model is not None:
            return model
        try:
            r.raise_for_status()
            return r.json()["data"][0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            raise BenchError(f"GET {self.base_url}/v1/models gave no model id (HTTP {r.status_code}); "
                             "pass --model") from None

    async def stream(self, path: str, payload: dict, res: RequestResult | None = None) -> RequestResult:
        """Send one streaming request and time it; never raises for a failed request. A caller that
        passes `res` sees it fill in while the stream runs (what a cancelled request got done)."""
        chat = "messages" in payload
        if res is None:
            res = RequestResult(start=time.perf_counter())
        res.start = time.perf_counter()
        try:
            async with self._http.stream("POST", path, json=payload) as r:
                if r.status_code != 200:
                    res.error = _error_text(r.status_code, await r.aread())
                else:
                    await self._read_events(r, res, chat)
        except httpx.HTTPError as e:
            res.error = _describe(e)
        res.end = time.perf_counter()
        if res.error is None and not res.chunk_times:
            res.error = "the stream ended without generated text"
        return res

    @staticmethod
    async def _read_events(r: httpx.Response, res: RequestResult, chat: bool) -> None:
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, other SSE fields
            data = line[5:].strip()
            if data == "[DONE]":
                return
            now = time.perf_counter()
            try:
                event = json.loads(data)
            except ValueError:
                res.error = f"bad SSE data: {data[:100]!r}"
                return
            if event.get("error"):
                err = event["error"]
                res.error = "in-stream error: " + str(err.get("message", err) if isinstance(err, dict) else err)
                return
            if _chunk_text(event, chat):
                res.chunk_times.append(now)
            usage = event.get("usage")
            if usage:
                res.prompt_tokens = usage.get("prompt_tokens")
                res.completion_tokens = usage.get("completion_tokens")

    # Files and Batches API (offline batch load)
    async def upload_batch_file(self, content: bytes) -> str:
        files = {"file": ("conserve-bench.jsonl", content, "application/jsonl")}
        r = await self._call("POST", "/v1/files", files=files, data={"purpose": "batch"})
        return r["id"]

    async def create_batch(self, file_id: str, endpoint_path: str) -> dict:
        return await self._call("POST", "/v1/batches", json={"input_file_id": file_id, "endpoint": endpoint_path,
                                                              "completion_window": "24h"})

    async def get_batch(self, batch_id: str) -> dict:
        return await self._call("GET", f"/v1/batches/{batch_id}")

    async def cancel_batch(self, batch_id: str) -> dict:
        return await self._call("POST", f"/v1/batches/{batch_id}/cancel")

    async def _call(self, method: str, path: str, **kw) -> dict:
        try:
            r = await self._http.request(method, path, timeout=60.0, **kw)
        except httpx.HTTPError as e:
            raise BenchError(f"{method} {path}: {_describe(e)}") from None
        if r.status_code >= 400:
            raise BenchError(f"{method} {path}: {_error_text(r.status_code, r.content)}")
        return r.json()
