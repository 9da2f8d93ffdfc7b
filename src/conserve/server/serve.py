"""`conserve serve`: load the model, start the engine thread and the HTTP server."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_serve_command(sub, parents, add_engine_args) -> None:
    p = sub.add_parser("serve", parents=parents, help="OpenAI-compatible HTTP server (online + offline)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", default=str(Path.home() / ".local/share/conserve"),
                   help="where uploaded files, batch jobs and their results live (survives restarts)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--served-model-name", default=None, help="model id reported by the API (default: file name)")
    p.add_argument("--max-upload-mb", type=float, default=512, help="largest accepted file upload")
    p.add_argument("--max-batch-concurrency", type=int, default=64,
                   help="batch lines submitted to the engine at once (keeps offline work saturated)")
    a = p.add_argument_group("admission and faults")
    a.add_argument("--max-waiting-requests", type=int, default=256,
                   help="HTTP requests of one class waiting for their first token; beyond it the server answers "
                        "429 with Retry-After (0: no limit). Batch API lines are not counted")
    a.add_argument("--max-waiting-flex-requests", type=int, default=None,
                   help="the same limit for flex (offline) HTTP requests (default: --max-waiting-requests)")
    a.add_argument("--max-predicted-ttft-factor", type=float, default=5.0,
                   help="answer 429 to an online request whose predicted time to first token (the latency "
                        "model's prefill time of the online prompts waiting ahead of it and its own) exceeds "
                        "this multiple of --slo-ttft-ms (0: off)")
    a.add_argument("--max-engine-restarts", type=int, default=5,
                   help="after a step fails, the engine is rebuilt (model reloaded); give up after this many "
                        "consecutive failed restarts, then /health and requests answer 503 (0: never restart)")
    a.add_argument("--engine-restart-backoff-s", type=float, default=1.0,
                   help="wait before the first restart; doubles with each consecutive failure, at most 60 s")
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace, wrap_engine=None) -> int:
    """wrap_engine: called on every engine built (first start and restarts) before it serves; tests
    use it to inject faults."""
    import uvicorn

    from conserve.async_engine import AsyncEngine
    from conserve.cli import engine_config
    from conserve.engine import Engine
    from conserve.server.admission import AdmissionLimits
    from conserve.server.app import build_app
    from conserve.server.batches import BatchRunner
    from conserve.server.files_batches_api import router as files_batches_router
    from conserve.server.metrics import Metrics
    from conserve.server.store import Store

    flex_limit = args.max_waiting_requests if args.max_waiting_flex_requests is None else args.max_waiting_flex_requests
    admission = AdmissionLimits(args.max_waiting_requests, flex_limit, args.max_predicted_ttft_factor,
                                args.slo_ttft_ms / 1000)

    # Open the durable store first: a data dir already used by another server fails before the
    # model is loaded.
    store = Store(args.data_dir)
    config = engine_config(args)

    def make_engine() -> Engine:
        engine = Engine(config)
        engine.warmup()
        if wrap_engine is not None:
            wrap_engine(engine)
        return engine

    metrics = Metrics()
    async_engine = AsyncEngine(make_engine, on_step=metrics.on_step, max_restarts=args.max_engine_restarts,
                               restart_backoff_s=args.engine_restart_backoff_s)
    name = args.served_model_name or async_engine.start().loaded.name  # no reference kept: restarts free it
    runners: list[BatchRunner] = []

    def batch_routes(serving):
        runners.append(BatchRunner(store, serving.execute, max_concurrency=args.max_batch_concurrency))
        return [files_batches_router(store, runners[0], int(args.max_upload_mb * 2**20))]

    async def startup() -> None:
        await runners[0].start()  # resumes batches a previous server left unfinished

    async def shutdown() -> None:
        await runners[0].shutdown()
        store.close()

    app = build_app(async_engine, name, metrics, api_key=args.api_key, extra_routers=batch_routes,
                    on_startup=startup, on_shutdown=shutdown, admission=admission)
    log.info("serving %s on http://%s:%d", name, args.host, args.port)
    print(f"conserve: serving {name} on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
