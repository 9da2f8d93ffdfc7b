"""The live dashboard: GET /dashboard (one static page, no build step, charts drawn by hand on canvas)
and GET /metrics.json, the state it polls every second: the metrics registry behind /metrics as JSON,
the objectives, and the newest batches with their progress and estimates."""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from conserve.server.metrics import Metrics


def router(metrics: Metrics, model_name: str, objectives: dict[str, float],
           batch_summaries: Callable[[], list[dict]] | None = None) -> APIRouter:
    """objectives: {"ttft_s", "tbt_s"}; batch_summaries: BatchRunner.summaries (None: no batch API)."""
    r = APIRouter()
    page = resources.files("conserve.server").joinpath("dashboard.html").read_text(encoding="utf-8")
    started = time.time()

    @r.get("/metrics.json", include_in_schema=False)
    async def metrics_json() -> dict:
        return {"time": time.time(), "started": started, "model": model_name, "objectives": objectives,
                "metrics": metrics.to_json(), "batches": batch_summaries() if batch_summaries else []}

    @r.get("/dashboard", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    return r
