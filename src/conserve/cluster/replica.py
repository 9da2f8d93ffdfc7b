"""One engine replica: the single-process server's engine and OpenAI serving logic, without HTTP. The
ingress calls it through a Ray Serve handle (deploy.py makes it a deployment); nothing here imports Ray.

Every answer is data, never an exception across the process boundary: a request's answer starts with a
Head (a whole JSON body, or "SSE lines follow"), and a batch line whose engine failed under it comes
back as an EngineFault, which the ingress runs again elsewhere.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from conserve.async_engine import DEAD
from conserve.cluster.engine_report import EngineReport
from conserve.cluster.stats import ReplicaStats
from conserve.cluster.wire import SSE_HEADERS, Accepted, EngineFault, Head
from conserve.config import EngineConfig
from conserve.errors import EngineUnavailable
from conserve.request import RequestClass
from conserve.server.config import ServerConfig
from conserve.server.errors import APIError, error_body, validation_message, validation_param
from conserve.server.metrics import Metrics
from conserve.server.openai_api import OpenAIServing
from conserve.server.protocol import CHAT, COMPLETIONS, ChatCompletionRequest, CompletionRequest
from conserve.server.serve import admission_limits, engine_under_supervisor


class EngineReplica:
    """name: the replica's deployment name (its label in the ingress's metrics). threads: torch CPU
    threads (None: torch's default)."""

    def __init__(self, name: str, config: EngineConfig, server: ServerConfig, threads: int | None = None) -> None:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        self.name = name
        self.started_at = time.time()
        self.config = config
        self.metrics = Metrics()
        self.report = EngineReport()

        def on_step(engine, outputs, seconds) -> None:
            self.metrics.on_step(engine, outputs, seconds)
            self.report.update(engine)

        self.engine = engine_under_supervisor(config, server, on_step)
        engine = self.engine.start()
        self.report.update(engine)  # the first report, before any step (it is idle: safe off its thread)
        loaded_name = engine.loaded.name
        del engine  # no reference kept: restarts free it
        self.model_name = server.served_model_name or loaded_name
        self.serving = OpenAIServing(self.engine, self.model_name, self.metrics, server.trust_request_chat_template,
                                     server.request_chat_template_timeout, admission_limits(server, config))
        self._loop: asyncio.AbstractEventLoop | None = None

    def _on_loop(self) -> None:
        """Outputs go to the event loop the calls run on (known at the first call)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self.engine.attach_loop(self._loop)

    # -- calls from the ingress ------------------------------------------------------------------
    async def info(self) -> dict:
        return {"model": self.model_name, "max_model_len": self.serving.max_model_len,
                "slo_ttft_s": self.config.slo_ttft_ms / 1000, "slo_tbt_s": self.config.slo_tbt_ms / 1000}

    async def request(self, endpoint: str, body: dict) -> AsyncIterator[Accepted | Head | str]:
        """An OpenAI chat or completions request: Accepted, a Head, then (when it streams) its SSE lines."""
        self._on_loop()
        yield Accepted()
        try:
            if endpoint == CHAT:
                answer = await self.serving.chat(ChatCompletionRequest.model_validate(body))
            elif endpoint == COMPLETIONS:
                answer = await self.serving.completion(CompletionRequest.model_validate(body))
            else:
                raise APIError(404, f"no endpoint {endpoint}")
        except ValidationError as e:
            yield Head(400, error_body(400, validation_message(e.errors()), validation_param(e.errors())))
            return
        except APIError as e:
            yield Head(e.status, error_body(e.status, e.message, e.param, e.code), e.headers)
            return
        if not isinstance(answer, StreamingResponse):
            yield Head(200, answer)
            return
        yield Head(200, None, SSE_HEADERS)
        async for line in answer.body_iterator:
            yield line

    async def execute(self, endpoint: str, body: dict, deadline: float | None) -> tuple[int, dict] | EngineFault:
        """One batch line (OpenAIServing.execute)."""
        self._on_loop()
        try:
            return await self.serving.execute(endpoint, body, deadline)
        except EngineUnavailable as e:
            return EngineFault(str(e))

    async def stats(self) -> ReplicaStats:
        self._on_loop()
        admission = self.serving.admission
        engine = self.engine.engine
        model = engine.latency_model if engine is not None else None
        r = self.report
        return ReplicaStats(
            name=self.name, pid=os.getpid(), node=_node_address(), started_at=self.started_at,
            serving=self.engine.is_running, slo_ttft_s=self.config.slo_ttft_ms / 1000,
            slo_tbt_s=self.config.slo_tbt_ms / 1000, chunk_tokens=self.config.max_num_batched_tokens,
            latency_model=model.portable() if model is not None else None,
            online_waiting=admission.waiting[RequestClass.ONLINE],
            online_queue_s=admission.queued_s[RequestClass.ONLINE], online_running=r.online_running,
            online_step_s=r.online_step_s, offline_capacity=r.offline_capacity, offline_requests=r.offline_requests)

    async def metrics_text(self) -> bytes:
        return self.metrics.render()

    async def check_health(self) -> None:
        """Ray Serve's health check: an engine that gave up restarting fails it, and Ray replaces the
        whole replica (a fresh process, the model loaded again)."""
        if self.engine.state == DEAD:
            raise RuntimeError(f"the engine stopped: {self.engine.dead!r}")

    async def shutdown(self) -> None:
        await self.serving.aclose()
        self.engine.shutdown()


def _node_address() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - not under Ray (tests): the host name says as much
        return socket.gethostname()
