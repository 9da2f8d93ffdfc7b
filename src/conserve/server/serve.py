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
    p.add_argument("--batch-max-engine-faults", type=int, default=3, metavar="N",
                   help="a batch line in flight when the engine fails is run again once the engine is back; "
                        "at its Nth engine fault it is committed as failed with a server_error (1: no retries)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="run the chat_template a chat request brings (off by default: a template is code; "
                        "such requests get 400). Each one renders in a sandbox process with a time and "
                        "memory limit; templates named by the model are always allowed")
    p.add_argument("--request-chat-template-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="time limit for rendering a request's own chat template (with "
                        "--trust-request-chat-template); a template that runs longer gets 400")
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from conserve.async_engine import AsyncEngine
    from conserve.cli import engine_config
    from conserve.engine import Engine
    from conserve.server.app import build_app
    from conserve.server.batch_retry import EngineRetry
    from conserve.server.batches import BatchRunner
    from conserve.server.files_batches_api import router as files_batches_router
    from conserve.server.metrics import Metrics
    from conserve.server.store import Store

    # Flags are checked, and the durable store opened, before the model is loaded: a bad value or a
    # data dir already used by another server fails at once.
    if args.request_chat_template_timeout <= 0:
        raise ValueError("--request-chat-template-timeout must be > 0 seconds")
    retry = EngineRetry(lambda: async_engine.is_running, max_faults=args.batch_max_engine_faults)
    store = Store(args.data_dir)
    config = engine_config(args)

    def make_engine() -> Engine:
        engine = Engine(config)
        engine.warmup()
        return engine

    metrics = Metrics()
    async_engine = AsyncEngine(make_engine, on_step=metrics.on_step)
    engine = async_engine.start()
    name = args.served_model_name or engine.loaded.name
    runners: list[BatchRunner] = []

    def batch_routes(serving):
        runners.append(BatchRunner(store, serving.execute, max_concurrency=args.max_batch_concurrency,
                                   retry=retry))
        return [files_batches_router(store, runners[0], int(args.max_upload_mb * 2**20))]

    async def startup() -> None:
        await runners[0].start()  # resumes batches a previous server left unfinished

    async def shutdown() -> None:
        await runners[0].shutdown()
        store.close()

    app = build_app(async_engine, name, metrics, api_key=args.api_key, extra_routers=batch_routes,
                    on_startup=startup, on_shutdown=shutdown,
                    trust_request_chat_template=args.trust_request_chat_template,
                    chat_template_timeout_s=args.request_chat_template_timeout)
    log.info("serving %s on http://%s:%d", name, args.host, args.port)
    print(f"conserve: serving {name} on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
