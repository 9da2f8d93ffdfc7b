"""Deadline-aware batches on a real `conserve serve`: two batches with different completion windows
under a closed loop of online chats; when each finishes, and what the server estimated.

A loose batch (window 24h) is created at t=0 and a tight one (30m) --gap seconds later, each of
--lines lines of --max-tokens tokens; one online client chats throughout (--online-tokens each). Both
batches are polled every --poll seconds. Reported per batch: when it was created, its estimated
completion (metadata conserve_estimated_completion_at) in the create response, at --early seconds and
mid-run (the first poll with half its lines done), and when it was seen finished; all in seconds
after t=0. --compare runs it twice, with deadlines (the default) and with --no-batch-deadlines.

Deadlines decide who gets the engine when there is more offline work than it runs at once: a real
batch has far more lines than the 64 batch slots. To get there with small batches, give the server
fewer slots than the two batches have lines:

    python benchmarks/deadlines.py --lines 16 --max-tokens 16 --online-tokens 8 --compare \\
        --server-arg=--max-batch-concurrency --server-arg=8
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import threading
import time

import httpx

from conserve.bench.servers import ServerProcess, ServerSpec, free_port

CHAT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")
QUESTIONS = ["Describe the sea.", "Explain how a bicycle works.", "Write about autumn.", "Why is the sky blue?"]


def batch_file(prefix: str, lines: int, max_tokens: int) -> bytes:
    return "".join(json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": CHAT, "body": {
        "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
        "max_tokens": max_tokens, "ignore_eos": True}}) + "\n" for i in range(lines)).encode()


def online_loop(url: str, model: str, tokens: int, stop: threading.Event, latencies: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=600) as client:
        while not stop.is_set():
            t = time.monotonic()
            r = client.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": "Tell me a fact."}],
                "max_tokens": tokens, "ignore_eos": True})
            if r.status_code == 200:
                latencies.append(time.monotonic() - t)


def estimate(doc: dict) -> float | None:
    value = (doc.get("metadata") or {}).get("conserve_estimated_completion_at")
    return float(value) if value is not None else None


def run(args: argparse.Namespace, deadlines: bool) -> dict:
    port = free_port()
    data_dir = tempfile.mkdtemp(prefix="conserve-deadlines-")
    argv = [sys.executable, "-m", "conserve.cli", "serve", "--port", str(port), "--data-dir", data_dir,
            *args.server_arg]
    if not deadlines:
        argv.append("--no-batch-deadlines")
    server = ServerProcess(ServerSpec(argv, port, f"{data_dir}/server.log", ready_timeout_s=900))
    stop, latencies = threading.Event(), []
    try:
        server.wait_ready()
        url = f"http://127.0.0.1:{port}"
        http = httpx.Client(base_url=url, timeout=60)
        model = http.get("/v1/models").json()["data"][0]["id"]
        files = {}
        for name in ("loose", "tight"):
            data = batch_file(name, args.lines, args.max_tokens)
            files[name] = http.post("/v1/files", files={"file": ("in.jsonl", io.BytesIO(data))},
                                    data={"purpose": "batch"}).json()["id"]
        worker = threading.Thread(target=online_loop, args=(url, model, args.online_tokens, stop, latencies),
                                  daemon=True)
        worker.start()
        time.sleep(args.warmup)  # the online loop is running before the batches arrive
        batches: dict[str, dict] = {}
        t0 = time.time()
        for name, window in (("loose", "24h"), ("tight", "30m")):
            if name == "tight":
                time.sleep(max(0.0, t0 + args.gap - time.time()))
            created = time.time()
            doc = http.post("/v1/batches", json={"input_file_id": files[name], "endpoint": CHAT,
                                                 "completion_window": window}).json()
            batches[name] = {"id": doc["id"], "window": window, "created": created - t0,
                             "estimate_at_create": _rel(estimate(doc), t0), "polls": []}
        while True:
            now = time.time()
            for b in batches.values():
                if b["polls"] and b["polls"][-1][1] in TERMINAL:
                    continue
                doc = http.get(f"/v1/batches/{b['id']}").json()
                b["polls"].append((now - t0, doc["status"], doc["request_counts"]["completed"],
                                   _rel(estimate(doc), t0)))
            if all(b["polls"][-1][1] in TERMINAL for b in batches.values()):
                break
            time.sleep(args.poll)
        for b in batches.values():
            polls = b.pop("polls")
            b["finished"] = next(t for t, status, _, _ in polls if status in TERMINAL)
            b["status"] = polls[-1][1]
            b["estimate_early"] = next(((e, t) for t, _, _, e in polls if t >= args.early and e is not None),
                                       (None, None))
            b["estimate_mid"] = next(((e, t) for t, _, done, e in polls if done >= args.lines / 2 and e is not None),
                                     (None, None))
        return {"deadlines": deadlines, "batches": batches, "online_chats": len(latencies),
                "online_latency_median_s": statistics.median(latencies) if latencies else None}
    finally:
        stop.set()
        server.stop()


def _rel(at: float | None, t0: float) -> float | None:
    return None if at is None else at - t0


def table(results: list[dict], early: float) -> str:
    f = lambda v: "—" if v is None else f"{v:.0f}"  # noqa: E731 - estimates are whole unix seconds
    rows = ["| deadlines | batch | window | created | estimate at creation | estimate at "
            f"{early:.0f} s | mid-run estimate (made at) | finished |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        label = "on (default)" if r["deadlines"] else "off (`--no-batch-deadlines`)"
        for name, b in r["batches"].items():
            mid, made = b["estimate_mid"]
            rows.append(f"| {label} | {name} | {b['window']} | {b['created']:.1f} | {f(b['estimate_at_create'])} | "
                        f"{f(b['estimate_early'][0])} | {f(mid)} ({f(made)}) | {b['finished']:.1f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=16, help="lines per batch")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens each batch line generates")
    p.add_argument("--online-tokens", type=int, default=16, help="tokens each online chat generates")
    p.add_argument("--gap", type=float, default=2.0, help="seconds between the two batches' creation")
    p.add_argument("--early", type=float, default=4.0, help="when the early estimate is read, seconds")
    p.add_argument("--poll", type=float, default=0.25, help="seconds between polls of the batches")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of online load before the batches")
    p.add_argument("--compare", action="store_true", help="also run with --no-batch-deadlines")
    p.add_argument("--no-deadlines", action="store_true", help="run only with --no-batch-deadlines")
    p.add_argument("--server-arg", action="append", default=[], help="passed to conserve serve (repeat)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    modes = [True, False] if args.compare else [not args.no_deadlines]
    results = [run(args, mode) for mode in modes]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results, args.early))
    for r in results:
        print(f"deadlines {'on' if r['deadlines'] else 'off'}: {r['online_chats']} online chats, median "
              f"{r['online_latency_median_s'] or float('nan'):.2f} s each")


if __name__ == "__main__":
    main()
