"""The FastAPI app: OpenAI endpoints, health, metrics, API-key check and OpenAI-shaped errors."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from conserve.async_engine import RESTARTING, AsyncEngine
from conserve.server import dashboard
from conserve.server.admission import AdmissionLimits
from conserve.server.errors import APIError, error_response
from conserve.server.http_errors import install_openai_errors
from conserve.server.metrics import Metrics
from conserve.server.openai_api import OpenAIServing
from conserve.server.protocol import ChatCompletionRequest, CompletionRequest


def build_app(engine: AsyncEngine, model_name: str, metrics: Metrics, api_key: str | None = None,
              extra_routers: Callable[[OpenAIServing], list] | None = None, on_startup=None,
              on_shutdown=None, trust_request_chat_template: bool = False,
              chat_template_timeout_s: float = 5.0, admission: AdmissionLimits | None = None,
              batch_summaries: Callable[[], list[dict]] | None = None) -> FastAPI:
    """engine: already started (AsyncEngine.start). extra_routers: given the serving object (whose
    `execute` runs one request offline), returns more routers to mount (the Files and Batches API).
    batch_summaries: the batches the dashboard shows (BatchRunner.summaries).
    trust_request_chat_template, chat_template_timeout_s, admission: see OpenAIServing."""
    serving = OpenAIServing(engine, model_name, metrics, trust_request_chat_template, chat_template_timeout_s,
                            admission)
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.attach_loop(asyncio.get_running_loop())
        if on_startup is not None:
            await on_startup()
        try:
            yield
        finally:
            if on_shutdown is not None:
                await on_shutdown()
            await serving.aclose()
            engine.shutdown()

    app = FastAPI(title="conserve", version="0.1.0", lifespan=lifespan)
    app.state.serving = serving

    install_openai_errors(app, metrics.http_errors, api_key)

    @app.get("/health")
    async def health():
        if engine.state == RESTARTING:
            return error_response(503, "the engine failed and is restarting",
                                  headers={"Retry-After": str(max(1, math.ceil(engine.retry_after())))})
        if not engine.is_running:
            return error_response(503, f"the engine is not running ({engine.state})")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(started),
                                            "owned_by": "conserve", "max_model_len": serving.max_model_len}]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"The model `{model_id}` does not exist", "model", "model_not_found")
        return {"id": model_name, "object": "model", "created": int(started), "owned_by": "conserve"}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request):
        return await serving.chat(body, raw)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        return await serving.completion(body, raw)

    for router in (extra_routers(serving) if extra_routers else []):
        app.include_router(router)
    config = engine.engine.config
    app.include_router(dashboard.router(metrics, model_name, {"ttft_s": config.slo_ttft_ms / 1000,
                                                              "tbt_s": config.slo_tbt_ms / 1000}, batch_summaries))

    @app.get("/", include_in_schema=False)
    async def root():
        return PlainTextResponse("conserve: OpenAI-compatible API under /v1\n")

    return app

