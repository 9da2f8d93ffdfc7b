"""One benchmark run, in-process: `await run_benchmark(BenchConfig(...))` returns the report dict."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import datetime, timezone

from conserve.bench.client import BenchClient, RequestResult
from conserve.bench.config import BenchConfig
from conserve.bench.metrics import summarize, timeline
from conserve.bench.offline import OfflineLoad, OfflineSummary, make_offline_load
from conserve.bench.progress import Progress
from conserve.bench.prompts import PromptBuilder
from conserve.bench.workload import OnlineRequest, build_workload, request_body

MAX_ERRORS_KEPT = 5


async def run_benchmark(config: BenchConfig) -> dict:
    """Send the online workload on schedule while the offline load (if any) runs, then report.
    Raises ValueError for a bad config and BenchError when the server cannot be used; failed requests
    are counted in the report, never raised."""
    config.validate()
    builder = PromptBuilder(config.tokenizer_json)
    workload = build_workload(config, builder)
    # every online request may be in flight at once (rate inf), plus the offline ones and the pollers
    connections = (config.max_concurrency or len(workload)) + config.offline_concurrency + 4
    client = BenchClient(config.base_url, config.resolved_api_key(), config.request_timeout_s, connections)
    try:
        model = await client.probe(config.model)
        return await _run(config, client, model, builder, workload)
    finally:
        await client.aclose()


async def _run(config: BenchConfig, client: BenchClient, model: str, builder: PromptBuilder,
               workload: list[OnlineRequest]) -> dict:
    results: list[RequestResult | None] = [None] * len(workload)
    progress = Progress(len(workload), enabled=not config.quiet)
    counts = {"done": 0, "failed": 0}
    offline: OfflineLoad | None = None

    def show(force: bool = False) -> None:
        offline_done = offline.summary.completed if offline and config.offline_mode != "none" else None
        progress.update(counts["done"], counts["failed"], offline_done, force)

    offline = make_offline_load(client, config, model, builder, show)
    sem = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None

    async def one(i: int, req: OnlineRequest) -> None:
        body = request_body(model, config.endpoint, req.prompt, req.output_len)
        if sem is None:
            res = await client.stream(config.endpoint_path, body)
        else:
            async with sem:  # waits client-side; latency counts from the actual send, as in vLLM
                res = await client.stream(config.endpoint_path, body)
        if res.prompt_tokens is None:
            res.prompt_tokens = req.input_len  # no usage from the server: the requested length
        results[i] = res
        counts["done"] += 1
        counts["failed"] += not res.ok
        show(force=counts["done"] == len(workload))

    await offline.prepare()
    tasks: list[asyncio.Task] = []
    t0 = time.perf_counter()
    offline.start()
    try:
        show(force=True)
        for i, req in enumerate(workload):
            delay = t0 + req.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, req)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    finally:
        for t in tasks:
            t.cancel()
        summary = await offline.stop()
        progress.close()
    return build_report(config, model, [r for r in results if r is not None], summary, t0, duration)


def build_report(config: BenchConfig, model: str, results: list[RequestResult], offline: OfflineSummary,
                 t0: float, duration: float) -> dict:
    report: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "base_url": config.base_url,
                    "model": model, "endpoint": config.endpoint_path, "num_prompts": len(results),
                    "config": dataclasses.asdict(config)}
    report.update(summarize(results, duration, config.percentiles, config.goodput or None))
    offline_tok_s = offline.tokens / max(duration, 1e-9)
    report.update({"offline_mode": offline.mode, "offline_completed": offline.completed,
                   "offline_failed": offline.failed, "offline_throughput_tok_s": offline_tok_s,
                   "offline_partial_tokens": offline.partial_tokens,
                   "total_throughput_tok_s": report["online_throughput_tok_s"] + offline_tok_s,
                   "offline_batch_id": offline.batch_id})
    errors = [r.error for r in results if r.error]
    report["errors"] = list(dict.fromkeys(errors))[:MAX_ERRORS_KEPT]  # first few distinct
    report["offline_errors"] = offline.errors
    report["warnings"] = [offline.warning] if offline.warning else []
    report["requests"] = [_record(r, t0) for r in results]
    line_tokens = config.offline_input_len + config.offline_output_len
    report["timeline"] = timeline(results, offline.results, t0, duration, offline.samples, line_tokens)
    return report


def _record(r: RequestResult, t0: float) -> dict:
    ok = r.ok
    tpot = r.tpot if ok else None
    return {"arrival_s": r.start - t0, "ttft_ms": r.ttft * 1e3 if ok else None,
            "tpot_ms": tpot * 1e3 if tpot is not None else None, "e2el_ms": r.e2el * 1e3 if ok else None,
            "itls_ms": [x * 1e3 for x in r.itls] if ok else [], "prompt_tokens": r.prompt_tokens if ok else None,
            "output_tokens": r.output_tokens if ok else None, "error": r.error}
