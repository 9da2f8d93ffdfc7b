"""`conserve serve`: load the model, start the engine thread and the HTTP server."""

from __future__ import annotations

import argparse
import logging

from conserve.cluster.config import ClusterConfig
from conserve.config import EngineConfig
from conserve.server.config import ServerConfig

log = logging.getLogger(__name__)


def add_serve_command(sub, parents) -> None:
    p = sub.add_parser("serve", parents=parents, help="OpenAI-compatible HTTP server (online + offline)")
    add_serve_flags(p)
    p.set_defaults(func=cmd_serve)


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    ServerConfig.add_flags(parser)
    ClusterConfig.add_flags(parser)
    EngineConfig.add_flags(parser)


def admission_limits(server: ServerConfig, config: EngineConfig):
    from conserve.server.admission import AdmissionLimits

    return AdmissionLimits(server.max_waiting_requests, server.flex_waiting_limit, server.max_predicted_ttft_factor,
                           config.slo_ttft_ms / 1000)


def engine_under_supervisor(config: EngineConfig, server: ServerConfig, on_step, wrap_engine=None):
    """An AsyncEngine (not started) that builds and warms up the engine on its own thread, and rebuilds
    it after a fault as the server flags say."""
    from conserve.async_engine import AsyncEngine
    from conserve.engine import Engine

    def make_engine() -> Engine:
        engine = Engine(config)
        engine.warmup()
        if wrap_engine is not None:
            wrap_engine(engine)
        return engine

    return AsyncEngine(make_engine, on_step=on_step, max_restarts=server.max_engine_restarts,
                       restart_backoff_s=server.engine_restart_backoff_s)


def cmd_serve(args: argparse.Namespace, wrap_engine=None) -> int:
    """wrap_engine: called on every engine built (first start and restarts) before it serves; tests
    use it to inject faults."""
    if ClusterConfig.from_flags(args).uses_ray:
        from conserve.cluster.launch import serve_on_ray

        return serve_on_ray(args)
    import uvicorn

    from conserve.server.app import build_app
    from conserve.server.batch_retry import EngineRetry
    from conserve.server.batches import BatchRunner
    from conserve.server.files_batches_api import router as files_batches_router
    from conserve.server.harvest import harvest_rate
    from conserve.server.metrics import Metrics
    from conserve.server.store import Store

    # Flags are checked, and the durable store opened, before the model is loaded: a bad value or a
    # data dir already used by another server fails at once.
    server = ServerConfig.from_flags(args)
    config = EngineConfig.from_flags(args)
    admission = admission_limits(server, config)
    retry = EngineRetry(lambda: async_engine.is_running, max_faults=server.batch_max_engine_faults)
    store = Store(server.data_dir)

    metrics = Metrics()
    async_engine = engine_under_supervisor(config, server, metrics.on_step, wrap_engine)
    name = server.served_model_name or async_engine.start().loaded.name  # no reference kept: restarts free it
    runners: list[BatchRunner] = []

    def batch_routes(serving):
        runners.append(BatchRunner(store, serving.execute, max_concurrency=server.max_batch_concurrency,
                                   retry=retry, deadlines=server.batch_deadlines, cost=serving.cost,
                                   harvest_rate=lambda: harvest_rate(async_engine.engine)))
        return [files_batches_router(store, runners[0], int(server.max_upload_mb * 2**20))]

    async def startup() -> None:
        await runners[0].start()  # resumes batches a previous server left unfinished

    async def shutdown() -> None:
        await runners[0].shutdown()
        store.close()

    app = build_app(async_engine, name, metrics, api_key=server.api_key, extra_routers=batch_routes,
                    batch_summaries=lambda: runners[0].summaries() if runners else [],
                    on_startup=startup, on_shutdown=shutdown, admission=admission,
                    trust_request_chat_template=server.trust_request_chat_template,
                    chat_template_timeout_s=server.request_chat_template_timeout)
    log.info("serving %s on http://%s:%d", name, server.host, server.port)
    print(f"conserve: serving {name} on http://{server.host}:{server.port}", flush=True)
    uvicorn.run(app, host=server.host, port=server.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
