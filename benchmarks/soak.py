"""Soak: drive one `conserve serve` for a stated time with hundreds of concurrent streams and a batch job,
kill it with SIGKILL half-way, restart it on the same data dir, and check that nothing was lost.

Clients: --streams closed-loop workers, each streaming chat completions one after another (a share of
them `service_tier: flex`), some vanishing mid-stream (they close the connection after a few chunks).
A 429 makes a worker honour Retry-After; a connection error (the server is down) makes it wait and retry.
A batch job of --batch-lines lines runs throughout and must finish with every custom_id answered once.

Reported (and written to --out as JSON): requests by outcome, requests lost (neither finished nor
answered with an error, or a stream cut without [DONE] while the server was up: must be 0), batch lines
missing or duplicated (must be 0), 429s, 503s, peak RSS of the server processes, KV blocks still in use
once the load is over (must be 0), P50/P99 TTFT and inter-token latency of completed streams by class.

    python benchmarks/soak.py --duration 300 --streams 200 --out results/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from conserve.bench.prompts import WORDS
from conserve.bench.servers import ServerProcess, ServerSpec, free_port

REQUEST_TIMEOUT_S = 600.0  # a request with no answer by then is lost


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)  # (class, outcome) -> count
    ttft: dict[str, list[float]] = field(default_factory=lambda: {"online": [], "flex": []})
    itl: dict[str, list[float]] = field(default_factory=lambda: {"online": [], "flex": []})
    lost_examples: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.data_dir = args.data_dir or tempfile.mkdtemp(prefix="conserve-soak-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tally = Tally()
        self.server: ServerProcess | None = None
        self.down = asyncio.Event()  # set while the server is being killed and restarted
        self.up = asyncio.Event()  # its complement: workers wait on it rather than hammer a dead port
        self.peak_rss_kb = 0
        self.kill_time: float | None = None
        self.restarted_time: float | None = None
        self._rss_stop = threading.Event()
        self.http: httpx.AsyncClient | None = None

    # -- the server ----------------------------------------------------------------------------
    def start_server(self) -> float:
        argv = [sys.executable, "-m", "conserve.cli", "serve", "--port", str(self.port), "--data-dir",
                self.data_dir, *self.args.server_arg]
        log = os.path.join(self.data_dir, f"server-{int(time.time())}.log")
        self.server = ServerProcess(ServerSpec(argv, self.port, log, ready_timeout_s=600))
        return self.server.wait_ready()

    def watch_rss(self) -> None:
        """Peak resident memory of whichever server process is current (VmHWM: its own high-water mark)."""
        while not self._rss_stop.wait(0.5):
            proc = self.server.proc if self.server else None
            if proc is None:
                continue
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.peak_rss_kb = max(self.peak_rss_kb, int(line.split()[1]))
            except OSError:
                pass

    async def kill_and_restart(self) -> None:
        await asyncio.sleep(self.args.duration * self.args.kill_at)
        print(f"soak: SIGKILL the server at t={self.args.duration * self.args.kill_at:.0f}s", flush=True)
        self.down.set()
        self.up.clear()
        self.kill_time = time.monotonic()
        os.killpg(self.server.proc.pid, signal.SIGKILL)
        self.server.proc.wait()
        ready = await asyncio.to_thread(self.start_server)
        # Keep-alive connections to the killed process would be reset on first use: as a client
        # library that retries on reconnect would, start over with a fresh pool.
        old, self.http = self.http, self.new_client()
        asyncio.get_running_loop().call_later(30, lambda: asyncio.ensure_future(old.aclose()))
        self.restarted_time = time.monotonic()
        self.down.clear()
        self.up.set()
        print(f"soak: restarted, ready after {ready:.1f}s", flush=True)

    # -- clients -------------------------------------------------------------------------------
    def prompt(self) -> str:
        n = self.rng.randint(self.args.prompt_words // 2, self.args.prompt_words * 3 // 2)
        return " ".join(self.rng.choice(WORDS) for _ in range(n))

    async def worker(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            await self.up.wait()
            flex = self.rng.random() < self.args.flex_fraction
            vanish_after = (self.rng.randint(1, 4) if self.rng.random() < self.args.vanish_fraction else None)
            wait = await self.one_stream(self.http, "flex" if flex else "online", vanish_after)
            if wait:
                await asyncio.sleep(wait)

    async def one_stream(self, http: httpx.AsyncClient, cls: str, vanish_after: int | None) -> float:
        """One streamed chat; returns how long to wait before the next (Retry-After, server down)."""
        body = {"messages": [{"role": "user", "content": self.prompt()}], "stream": True,
                "max_tokens": self.rng.randint(8, self.args.max_tokens), "temperature": 0.7}
        if cls == "flex":
            body["service_tier"] = "flex"
        sent = time.monotonic()
        times: list[float] = []
        outcome, wait = "lost", 0.0  # lost: neither finished nor answered with an error
        try:
            async with http.stream("POST", f"{self.url}/v1/chat/completions", json=body,
                                   timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=5.0)) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    outcome = f"http_{resp.status_code}"
                    if resp.status_code in (429, 503):
                        wait = float(resp.headers.get("retry-after", "1"))
                else:
                    outcome = await self._read_stream(resp, times, vanish_after)
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as e:
            if self._in_kill_window(sent):
                outcome, wait = "cut_by_kill", 1.0  # the server was killed under it: a cut, not a loss
            else:
                since = f", sent {sent - self.restarted_time:.1f}s after the restart" if self.restarted_time else ""
                self.tally.lost_examples.append(f"{cls}: {type(e).__name__}: {e}{since}")
        except httpx.TimeoutException as e:
            self.tally.lost_examples.append(f"{cls}: no answer in {REQUEST_TIMEOUT_S:.0f}s: {e}")
        if outcome == "lost" and self._in_kill_window(sent):
            outcome, wait = "cut_by_kill", 1.0
        self.tally.outcomes[(cls, outcome)] += 1
        if outcome == "ok" and times:
            self.tally.ttft[cls].append(times[0] - sent)
            self.tally.itl[cls].extend(b - a for a, b in zip(times, times[1:]))
        return wait

    async def _read_stream(self, resp: httpx.Response, times: list[float], vanish_after: int | None) -> str:
        errored = False
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                return "error_event" if errored else "ok"
            event = json.loads(data)
            if "error" in event:
                errored = True
            elif any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                times.append(time.monotonic())
                if vanish_after is not None and len(times) >= vanish_after:
                    return "vanished"  # leaving the block closes the connection mid-stream
        return "lost"  # cut without [DONE]

    def _in_kill_window(self, sent: float) -> bool:
        """Sent before the restart finished while a kill happened (or is happening)."""
        return self.down.is_set() or (self.kill_time is not None and sent <= (self.restarted_time or float("inf")))

    # -- the batch job -------------------------------------------------------------------------
    async def create_batch(self, http: httpx.AsyncClient) -> str:
        lines = [json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"messages": [{"role": "user", "content": self.prompt()}],
                                      "max_tokens": self.rng.randint(8, self.args.max_tokens)}})
                 for i in range(self.args.batch_lines)]
        files = {"file": ("soak.jsonl", "\n".join(lines).encode(), "application/jsonl")}
        r = await http.post(f"{self.url}/v1/files", data={"purpose": "batch"}, files=files)
        r.raise_for_status()
        r = await http.post(f"{self.url}/v1/batches", json={"input_file_id": r.json()["id"],
                                                             "endpoint": "/v1/chat/completions",
                                                             "completion_window": "24h"})
        r.raise_for_status()
        return r.json()["id"]

    async def finish_batch(self, http: httpx.AsyncClient, batch_id: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        batch = {}
        while time.monotonic() < deadline:
            try:
                batch = (await http.get(f"{self.url}/v1/batches/{batch_id}")).json()
            except httpx.HTTPError:
                await asyncio.sleep(2)
                continue
            if batch.get("status") in ("completed", "failed", "expired", "cancelled"):
                break
            await asyncio.sleep(2)
        ids: Counter = Counter()
        for key in ("output_file_id", "error_file_id"):
            if batch.get(key):
                text = (await http.get(f"{self.url}/v1/files/{batch[key]}/content")).text
                ids.update(json.loads(line)["custom_id"] for line in text.splitlines() if line.strip())
        expected = {f"line-{i}" for i in range(self.args.batch_lines)}
        return {"status": batch.get("status"), "request_counts": batch.get("request_counts"),
                "missing": len(expected - set(ids)), "duplicated": sum(n - 1 for n in ids.values() if n > 1)}

    # -- the run -------------------------------------------------------------------------------
    def new_client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.args.streams + 16, max_keepalive_connections=self.args.streams)
        return httpx.AsyncClient(limits=limits, timeout=30.0)

    async def run(self) -> dict:
        print(f"soak: starting the server (data dir {self.data_dir})", flush=True)
        await asyncio.to_thread(self.start_server)
        self.up.set()
        threading.Thread(target=self.watch_rss, daemon=True).start()
        self.http = self.new_client()
        try:
            batch_id = await self.create_batch(self.http)
            t0 = time.monotonic()
            deadline = t0 + self.args.duration
            tasks = [asyncio.create_task(self.worker(deadline)) for _ in range(self.args.streams)]
            if self.args.kill_at > 0:
                tasks.append(asyncio.create_task(self.kill_and_restart()))
            progress = asyncio.create_task(self.report_progress(t0))
            await asyncio.gather(*tasks)
            progress.cancel()
            print("soak: load over; waiting for the batch to finish", flush=True)
            batch = await self.finish_batch(self.http, batch_id, self.args.batch_timeout)
            await asyncio.sleep(2)  # the engine thread frees aborted requests' blocks on its next pass
            metrics = (await self.http.get(f"{self.url}/metrics")).text
        finally:
            await self.http.aclose()
        self._rss_stop.set()
        self.server.stop()
        return self.summary(batch, metrics)

    async def report_progress(self, t0: float) -> None:
        while True:
            await asyncio.sleep(15)
            done = sum(n for (_, o), n in self.tally.outcomes.items() if o == "ok")
            print(f"soak: t={time.monotonic() - t0:.0f}s ok={done} outcomes={dict(self.summary_outcomes())}",
                  flush=True)

    def summary_outcomes(self) -> Counter:
        out: Counter = Counter()
        for (cls, outcome), n in self.tally.outcomes.items():
            out[f"{cls}:{outcome}"] += n
        return out

    def summary(self, batch: dict, metrics: str) -> dict:
        def gauge(name: str) -> float | None:
            m = re.search(rf"^{name} ([0-9.e+-]+)$", metrics, re.M)
            return float(m.group(1)) if m else None

        def pct(xs: list[float], q: float) -> float | None:
            return statistics.quantiles(xs, n=100)[q - 1] * 1000 if len(xs) >= 2 else None

        outcomes = self.summary_outcomes()
        lost = sum(n for k, n in outcomes.items() if k.endswith(":lost"))
        return {
            "args": vars(self.args), "outcomes": dict(outcomes), "requests_lost": lost,
            "lost_examples": self.tally.lost_examples[:10],
            "http_429": sum(n for k, n in outcomes.items() if k.endswith(":http_429")),
            "http_503": sum(n for k, n in outcomes.items() if k.endswith(":http_503")),
            "batch": batch, "peak_rss_mib": round(self.peak_rss_kb / 1024),
            "kv_blocks_used_after": gauge("conserve_kv_blocks_used"),
            "latency_ms": {cls: {"ttft_p50": pct(self.tally.ttft[cls], 50), "ttft_p99": pct(self.tally.ttft[cls], 99),
                                 "itl_p50": pct(self.tally.itl[cls], 50), "itl_p99": pct(self.tally.itl[cls], 99),
                                 "completed": len(self.tally.ttft[cls])} for cls in ("online", "flex")},
        }


def print_table(result: dict) -> None:
    b = result["batch"]
    rows = [("requests lost (must be 0)", result["requests_lost"]),
            ("batch lines missing / duplicated (must be 0)", f"{b['missing']} / {b['duplicated']}"),
            ("batch status", b["status"]),
            ("429 answers", result["http_429"]), ("503 answers", result["http_503"]),
            ("peak RSS of the server (MiB)", result["peak_rss_mib"]),
            ("KV blocks in use after the load (must be 0)", result["kv_blocks_used_after"])]
    for cls, lat in result["latency_ms"].items():
        fmt = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
        rows.append((f"{cls}: completed streams, TTFT P50/P99 ms, ITL P50/P99 ms",
                     f"{lat['completed']}, {fmt(lat['ttft_p50'])}/{fmt(lat['ttft_p99'])}, "
                     f"{fmt(lat['itl_p50'])}/{fmt(lat['itl_p99'])}"))
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print("\noutcomes:", json.dumps(result["outcomes"], sort_keys=True))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=300, help="seconds of load (default: %(default)s)")
    p.add_argument("--streams", type=int, default=200, help="concurrent streaming clients (default: %(default)s)")
    p.add_argument("--flex-fraction", type=float, default=0.5, help="share of streams that are flex")
    p.add_argument("--vanish-fraction", type=float, default=0.2, help="share of clients that vanish mid-stream")
    p.add_argument("--prompt-words", type=int, default=60, help="mean prompt length in words (~tokens)")
    p.add_argument("--max-tokens", type=int, default=48, help="largest max_tokens of a request")
    p.add_argument("--batch-lines", type=int, default=200, help="lines of the batch job")
    p.add_argument("--batch-timeout", type=float, default=1800, help="seconds to wait for the batch after the load")
    p.add_argument("--kill-at", type=float, default=0.5, help="SIGKILL the server at this fraction of the duration "
                   "and restart it (0: never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="server data dir (default: a fresh temporary one)")
    p.add_argument("--server-arg", action="append", default=[], help="extra `conserve serve` argument "
                   "(repeatable), e.g. --server-arg=--max-waiting-requests=64")
    p.add_argument("--out", default="results/soak.json", help="JSON result (default: %(default)s)")
    args = p.parse_args()
    result = asyncio.run(Soak(args).run())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print_table(result)
    ok = (result["requests_lost"] == 0 and result["batch"]["missing"] == 0 and result["batch"]["duplicated"] == 0
          and result["kv_blocks_used_after"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
