"""Test-only server: the Files and Batches router over a fake `execute` (no model, no engine).

The fake echoes the last chat message (or the prompt) back as a chat.completion / text_completion,
answers 400 when the body has "max_tokens": -1, sleeps `body["sleep"]` seconds (default: `delay`), and
appends "<pid> <text>" to `log_path` for every executed request, so crash tests can prove which lines
ran in which process.

Run as a script (for SIGKILL tests): python batch_server_app.py --data-dir D --fd N [--delay S] [--log F]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from pathlib import Path

from fastapi import FastAPI, Request

from conserve.server.batches import BatchRunner, Execute
from conserve.server.errors import APIError, error_body, error_response
from conserve.server.files_batches_api import router
from conserve.server.store import Store


def fake_execute(delay: float = 0.0, log_path: str | Path | None = None) -> Execute:
    async def execute(endpoint: str, body: dict, deadline: float | None = None) -> tuple[int, dict]:
        if body.get("max_tokens") == -1:
            return 400, error_body(400, "max_tokens must be at least 1", "max_tokens")
        await asyncio.sleep(float(body.get("sleep", delay)))
        chat = endpoint == "/v1/chat/completions"
        text = body["messages"][-1]["content"] if chat else body.get("prompt", "")
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(f"{os.getpid()} {text}\n")
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": f"echo: {text}"},
                      "finish_reason": "stop", "logprobs": None}
            return 200, {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "fake",
                         "choices": [choice], "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                        "total_tokens": 2}}
        return 200, {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": "fake",
                     "choices": [{"index": 0, "text": f"echo: {text}", "finish_reason": "stop",
                                  "logprobs": None}]}

    return execute


def build_app(data_dir: str | Path, *, delay: float = 0.0, log_path: str | Path | None = None,
              max_upload_bytes: int = 1 << 20, max_concurrency: int = 8, window_s: float | None = None) -> FastAPI:
    store = Store(data_dir)
    runner = BatchRunner(store, fake_execute(delay, log_path), max_concurrency=max_concurrency, window_s=window_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await runner.start()
        try:
            yield
        finally:
            await runner.shutdown()
            store.close()

    app = FastAPI(lifespan=lifespan)
    app.state.store, app.state.runner = store, runner

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code)

    app.include_router(router(store, runner, max_upload_bytes))
    return app


if __name__ == "__main__":
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", required=True)
    p.add_argument("--fd", type=int, required=True, help="an inherited, listening socket")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--log", default=None)
    p.add_argument("--concurrency", type=int, default=8)
    a = p.parse_args()
    uvicorn.run(build_app(a.data_dir, delay=a.delay, log_path=a.log, max_concurrency=a.concurrency),
                fd=a.fd, log_level="warning")
