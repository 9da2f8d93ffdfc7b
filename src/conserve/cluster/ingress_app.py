"""The ingress's HTTP app: the OpenAI endpoints in front of the replicas, the one durable Files and
Batches API (its store on the ingress's machine), health, metrics and the replicas' state. Torch-free.

Requests are validated here (the same 400s as the single-process server) and sent whole to the replica
the router picks; the replica tokenises, admits and runs them and its answer is relayed as it comes.
"""

from __future__ import annotations

import contextlib
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from conserve.cluster.dispatch import Answer, Dispatcher, ReplicaLost, replica_lost_error
from conserve.cluster.metrics import ClusterMetrics
from conserve.server.batch_estimate import rough_cost
from conserve.server.batch_retry import EngineRetry
from conserve.server.batches import BatchRunner
from conserve.server.config import ServerConfig
from conserve.server.errors import APIError, error_body, error_response
from conserve.server.files_batches_api import router as files_batches_router
from conserve.server.http_errors import install_openai_errors
from conserve.server.protocol import CHAT, COMPLETIONS, ChatCompletionRequest, CompletionRequest
from conserve.server.store import Store

REPLICA_HEADER = "x-conserve-replica"  # which replica answered (debugging, tests)


def build_ingress_app(dispatcher: Dispatcher, store: Store, server: ServerConfig, model_name: str,
                      max_model_len: int, metrics: ClusterMetrics) -> FastAPI:
    """dispatcher: not started (the app starts it). store: opened on this machine; the app closes it."""
    # The batch runner is the single-process server's: only where a line runs differs (a leased replica).
    runner = BatchRunner(store, dispatcher.execute_line, max_concurrency=server.max_batch_concurrency,
                         retry=EngineRetry(dispatcher.router.any_up, max_faults=server.batch_max_engine_faults),
                         deadlines=server.batch_deadlines, harvest_rate=dispatcher.harvest_capacity)
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await dispatcher.start()
        await runner.start()  # resumes batches the last ingress left unfinished
        try:
            yield
        finally:
            await runner.shutdown()
            store.close()
            await dispatcher.close()

    app = FastAPI(title="conserve", version="0.1.0", lifespan=lifespan)
    install_openai_errors(app, metrics.http_errors, server.api_key)

    async def forward(endpoint: str, req: ChatCompletionRequest | CompletionRequest, raw: Request):
        body = await raw.json()
        answer = await dispatcher.open(endpoint, body, req.request_class, rough_cost(endpoint, body)[0])
        head = answer.head
        headers = {**(head.headers or {}), REPLICA_HEADER: answer.replica}
        if head.status >= 400:
            metrics.http_errors.labels(str(head.status)).inc()
        if not head.streams:
            await answer.close()
            return JSONResponse(head.body, status_code=head.status, headers=headers)
        # The background task runs once the response ends, a client gone before the first line included.
        return StreamingResponse(_relay(answer), media_type="text/event-stream", headers=headers,
                                 background=BackgroundTask(answer.close))

    @app.post(CHAT)
    async def chat(body: ChatCompletionRequest, raw: Request):
        return await forward(CHAT, body, raw)

    @app.post(COMPLETIONS)
    async def completions(body: CompletionRequest, raw: Request):
        return await forward(COMPLETIONS, body, raw)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(started),
                                            "owned_by": "conserve", "max_model_len": max_model_len}]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"The model `{model_id}` does not exist", "model", "model_not_found")
        return {"id": model_name, "object": "model", "created": int(started), "owned_by": "conserve"}

    app.include_router(files_batches_router(store, runner, int(server.max_upload_mb * 2**20)))

    @app.get("/health")
    async def health():
        """503 until every replica has reported once (starting), then 200 while any replica is up."""
        router = dispatcher.router
        up, total = sum(router.is_up(n) for n in router.names), len(router.names)
        if not all(router.stats(n) is not None for n in router.names):
            return error_response(503, f"starting: {up} of {total} engine replicas up", headers={"Retry-After": "1"})
        if not up:
            return error_response(503, "no engine replica is up", headers={"Retry-After": "1"})
        return {"status": "ok", "replicas_up": up, "replicas": total}

    @app.get("/replicas")
    async def replicas():
        return {"object": "list", "data": [_replica_doc(dispatcher, n) for n in dispatcher.router.names]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(await dispatcher.replica_metrics()),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def root():
        return PlainTextResponse("conserve: OpenAI-compatible API under /v1 (replicas: /replicas)\n")

    return app


async def _relay(answer: Answer):
    try:
        async for line in answer.lines():
            yield line
    except ReplicaLost:  # headers are gone: report it in-band, as OpenAI does
        e = replica_lost_error(answer.replica)
        yield f"data: {json.dumps(error_body(e.status, e.message, e.param, e.code))}\n\n"
        yield "data: [DONE]\n\n"


def _replica_doc(dispatcher: Dispatcher, name: str) -> dict:
    router = dispatcher.router
    stats = router.stats(name)
    doc = {"name": name, "up": router.is_up(name), "restarts": router.restarts(name),
           "offline_in_flight": router.offline_in_flight(name)}
    if stats is not None:
        doc.update(pid=stats.pid, node=stats.node, started_at=stats.started_at, at_risk=stats.at_risk,
                   online_waiting=stats.online_waiting, online_running=stats.online_running,
                   online_queue_s=stats.online_queue_s, offline_requests=stats.offline_requests,
                   harvest_capacity_tokens_per_s=stats.offline_capacity)
    return doc
