"""Offline load kept up beside the online run: flex requests or one Batch API job.

Flex: K workers each send a `service_tier: "flex"` request and, when it ends, the next one, so K are
always in flight; throughput counts the completed ones' usage (prompt + generated tokens). Requests
still running when the online run ends are cancelled, and the work they got done counts too: the
prompt once their first token arrived, plus the tokens streamed so far (a prompt whose first token had
not come yet counts nothing). Without that, a scheduler that advances all K requests together
completes fewer of them inside the window than one that runs them one after another, for the same
tokens computed (K requests of 1152 tokens in flight are ~9k tokens: ~10% of a 120 s run here).
Batch: one job of `offline_batch_size` lines, polled for `request_counts.completed`; its throughput is
approximated as completed lines x (offline input + output length), since a line's usage is only in the
output file, and it is cancelled when the online run ends.
`offline_service_tier` / `offline_extra_body` change how offline requests are marked (vLLM: priority).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from conserve.bench.client import BenchClient, BenchError, RequestResult
from conserve.bench.config import BenchConfig
from conserve.bench.prompts import PromptBuilder
from conserve.bench.workload import request_body

MAX_ERRORS_KEPT = 5


@dataclass
class OfflineSummary:
    mode: str  # "none", "flex" or "batch"
    completed: int = 0
    failed: int = 0
    tokens: int = 0  # prompt + generated tokens done during the online run (completed and partial)
    partial_tokens: int = 0  # the part of `tokens` from requests cancelled at the end
    errors: list[str] = field(default_factory=list)  # the first few
    results: list[RequestResult] = field(default_factory=list)  # flex: completed requests (timeline)
    samples: list[tuple[float, int]] = field(default_factory=list)  # batch: (perf_counter, completed)
    batch_id: str | None = None
    warning: str | None = None

    def note_error(self, message: str) -> None:
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(message)


class OfflineLoad:
    """No offline load; the base of the two real ones."""

    def __init__(self, client: BenchClient, config: BenchConfig, model: str, builder: PromptBuilder,
                 on_progress: Callable[[], None] = lambda: None) -> None:
        self.client, self.config, self.model, self.builder = client, config, model, builder
        self.on_progress = on_progress
        self.summary = OfflineSummary(config.offline_mode)

    async def prepare(self) -> None:
        """Work done before the clock starts (uploading a batch file)."""

    def start(self) -> None:
        pass

    async def stop(self) -> OfflineSummary:
        return self.summary


class FlexLoad(OfflineLoad):
    def start(self) -> None:
        self._in_flight: dict[int, RequestResult] = {}
        self._tasks = [asyncio.create_task(self._worker(w)) for w in range(self.config.offline_concurrency)]

    async def _worker(self, w: int) -> None:
        cfg, s = self.config, self.summary
        rng = random.Random(f"offline-{cfg.seed}-{w}")  # str seeds are stable across processes
        backoff = 0.0
        while True:
            prompt = self.builder.build(cfg.offline_input_len, rng)
            body = offline_body(cfg, self.model, prompt)
            res = self._in_flight[w] = RequestResult(start=time.perf_counter())
            await self.client.stream(cfg.endpoint_path, body, res)
            del self._in_flight[w]
            if res.ok:
                s.completed += 1
                s.tokens += (res.prompt_tokens or cfg.offline_input_len) + res.output_tokens
                s.results.append(res)
                backoff = 0.0
            else:
                s.failed += 1
                s.note_error(res.error or "")
                backoff = min(1.0, max(0.05, 2 * backoff))  # a server refusing flex must not be hammered
                await asyncio.sleep(backoff)
            self.on_progress()

    async def stop(self) -> OfflineSummary:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        s = self.summary
        for res in self._in_flight.values():
            if res.chunk_times and res.error is None:
                done = (res.prompt_tokens or self.config.offline_input_len) + len(res.chunk_times)
                s.tokens += done
                s.partial_tokens += done
        self._in_flight.clear()
        return s


class BatchLoad(OfflineLoad):
    async def prepare(self) -> None:
        cfg = self.config
        rng = random.Random(f"offline-batch-{cfg.seed}")
        lines = []
        for i in range(cfg.offline_batch_size):
            body = offline_body(cfg, self.model, self.builder.build(cfg.offline_input_len, rng), stream=False)
            lines.append(json.dumps({"custom_id": f"bench-{i}", "method": "POST", "url": cfg.endpoint_path,
                                     "body": body}))
        file_id = await self.client.upload_batch_file(("\n".join(lines) + "\n").encode())
        batch = await self.client.create_batch(file_id, cfg.endpoint_path)
        self.summary.batch_id = batch["id"]
        self._baseline = _completed(batch)  # lines done before the clock starts do not count

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await self._sample()
            self.on_progress()
            await asyncio.sleep(self.config.offline_batch_poll_s)

    async def _sample(self) -> dict | None:
        try:
            batch = await self.client.get_batch(self.summary.batch_id or "")
        except BenchError as e:
            self.summary.note_error(str(e))
            return None
        done = _completed(batch) - self._baseline
        self.summary.samples.append((time.perf_counter(), done))
        self.summary.completed = max(self.summary.completed, done)
        self.summary.failed = (batch.get("request_counts") or {}).get("failed", 0)
        if batch.get("status") in ("completed", "failed", "expired", "cancelled"):
            self.summary.warning = (f"offline batch {batch['id']} ended ({batch['status']}) before the online "
                                    "run did: raise --offline-batch-size to keep the offline load up")
        return batch

    async def stop(self) -> OfflineSummary:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._sample()
        try:
            await self.client.cancel_batch(self.summary.batch_id or "")
        except BenchError as e:
            if self.summary.warning is None:  # a finished batch cannot be cancelled: that is expected
                self.summary.note_error(f"cancelling the offline batch: {e}")
        s = self.summary
        s.tokens = s.completed * (self.config.offline_input_len + self.config.offline_output_len)
        return s


def offline_body(cfg: BenchConfig, model: str, prompt: str, stream: bool = True) -> dict:
    body = request_body(model, cfg.endpoint, prompt, cfg.offline_output_len, stream=stream,
                        flex=cfg.offline_service_tier and stream)  # batch lines are offline already
    body.update(cfg.offline_extra_body)
    return body


def _completed(batch: dict) -> int:
    return int((batch.get("request_counts") or {}).get("completed", 0))


def make_offline_load(client: BenchClient, config: BenchConfig, model: str, builder: PromptBuilder,
                      on_progress: Callable[[], None] = lambda: None) -> OfflineLoad:
    cls = {"none": OfflineLoad, "flex": FlexLoad, "batch": BatchLoad}[config.offline_mode]
    return cls(client, config, model, builder, on_progress)
