"""Preemption benchmark: how long an online arrival waits for an offline-only iteration (layer-wise vs
iteration-level preemption), and what resuming a preempted offline request costs (checkpoint vs swap
vs recompute) for contexts of 256 to 4096 tokens.

    python benchmarks/preemption.py [--quick] [--device cpu] [--output results/preemption.json]

Part 1 runs a large offline batch on an engine thread and injects short online requests at random
times from the main thread, as the server's front end does; the wait is from the arrival to the
moment the engine thread picks the request up (the stopped or finished iteration's end).
Part 2 prefills one offline request, lets its checkpoint land (as it does in the background while it
runs), preempts it, and times the preemption and the resume until its KV is back on the device.
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import statistics
import threading
import time
from pathlib import Path

from conserve.bench.metrics import percentile
from conserve.config import EngineConfig
from conserve.engine import Engine
from conserve.request import RequestClass, RequestStatus
from conserve.sampling_params import SamplingParams
from conserve.sched.output import SchedulerOutput


def prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(300, 40000) for _ in range(length - 1)]


def preemption_latency(mode: str, args) -> dict:
    """mode: layer (stop at the next safepoint, resume from there later), layer-restart (stop when waiting
    would cost the arrival more than a TBT objective or break its TTFT objective; compute the iteration
    again later), iteration (never stop mid-iteration)."""
    engine = Engine(EngineConfig(device=args.device, preemption=mode))
    engine.warmup()
    offline = SamplingParams(temperature=0, max_tokens=args.offline_output, ignore_eos=True)
    for i in range(args.offline_batch):
        engine.add_request(f"off{i}", prompt(i, args.offline_prompt), offline, RequestClass.OFFLINE)
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    picked: dict[str, float] = {}
    stop = threading.Event()
    steps: list[tuple[float, float, bool, bool]] = []  # (start, end, stopped at a safepoint, online ran)

    def loop() -> None:  # the engine thread, as AsyncEngine runs it
        while not stop.is_set():
            seen = engine.preemption.arrivals
            while True:
                try:
                    rid, ids = inbox.get_nowait()
                except queue.Empty:
                    break
                picked[rid] = time.monotonic()
                engine.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
            if not engine.has_unfinished_requests():
                time.sleep(0.001)
                continue
            stops = engine.preemption.num_preemptions
            online = any(r.is_online for r in engine.scheduler.running + engine.scheduler.waiting)
            begin = time.monotonic()
            engine.step(seen)
            steps.append((begin, time.monotonic(), engine.preemption.num_preemptions > stops, online))

    thread = threading.Thread(target=loop, name="engine")
    thread.start()
    time.sleep(args.settle)  # past the offline prefill burst: a steady offline decode batch
    rng = random.Random(0)
    arrived: dict[str, float] = {}
    preempted_before = engine.preemption.num_preemptions
    started = time.monotonic()
    tokens_before = engine.stats.offline_tokens  # positions computed by committed iterations
    for i in range(args.arrivals):
        time.sleep(rng.uniform(0.5, 1.5) * args.interval)
        rid, ids = f"on{i}", prompt(1000 + i, args.online_prompt)
        arrived[rid] = time.monotonic()
        inbox.put((rid, ids))
        engine.preemption.online_arrival(len(ids))
    time.sleep(args.interval)
    elapsed = time.monotonic() - started
    stop.set()
    thread.join()
    waits = [1000 * (picked[r] - arrived[r]) for r in arrived if r in picked]
    # What each arrival waited for: the step running when it arrived.
    causes = []
    for r in sorted(arrived, key=lambda r: picked.get(r, 0) - arrived[r], reverse=True)[:3]:
        step = next((s for s in steps if s[0] <= arrived[r] < s[1]), None)
        if step is not None:
            causes.append({"wait_ms": 1000 * (picked[r] - arrived[r]), "step_ms": 1000 * (step[1] - step[0]),
                           "stopped": step[2], "online_in_batch": step[3]})
    return {"mode": mode, "arrivals": len(waits), "p50_wait_ms": percentile(waits, 50),
            "p99_wait_ms": percentile(waits, 99), "mean_wait_ms": statistics.fmean(waits),
            "layer_stops": engine.preemption.num_preemptions - preempted_before,
            "offline_tok_s": (engine.stats.offline_tokens - tokens_before) / elapsed,
            "resumed": engine.stats.resumed, "layers_discarded": engine.stats.layers_discarded,
            "longest_waits": causes}


def resume_cost(offline_kv: str, context: int, args) -> dict:
    engine = Engine(EngineConfig(device=args.device, offline_kv=offline_kv, kv_cache_gb=0.5, max_model_len=8192))
    engine.add_request("r", prompt(context, context), SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
                       RequestClass.OFFLINE)
    request = engine.scheduler.requests["r"]
    while request.num_computed_tokens < context:
        engine.step()
    engine.settle()  # the checkpoint copies land in the background while a request runs
    computed = request.num_computed_tokens
    sched = engine.scheduler
    t0 = time.perf_counter()
    sched._preempt(request, SchedulerOutput())  # what an online request's memory need triggers
    preempt_ms = 1000 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    while request.status is not RequestStatus.RUNNING or request.prefetch_job is not None or \
            request.num_computed_tokens < computed:
        engine.step()
    resume_ms = 1000 * (time.perf_counter() - t0)
    return {"offline_kv": offline_kv, "context": context, "preempt_ms": preempt_ms, "resume_ms": resume_ms,
            "recomputed_tokens": sched.num_tokens_recomputed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer arrivals and contexts")
    p.add_argument("--device", default="cpu")
    # Summarisation-like offline work: long prompts keep prefill chunks (the longest iterations) coming.
    p.add_argument("--offline-batch", type=int, default=200)
    p.add_argument("--offline-prompt", type=int, default=1024)
    p.add_argument("--offline-output", type=int, default=32)
    p.add_argument("--online-prompt", type=int, default=64)
    p.add_argument("--arrivals", type=int, default=30)
    p.add_argument("--interval", type=float, default=0.7, help="mean seconds between online arrivals")
    p.add_argument("--settle", type=float, default=5.0, help="seconds of offline-only work before arrivals")
    p.add_argument("--output", default="results/preemption.json")
    args = p.parse_args()
    contexts = (256, 1024, 4096) if args.quick else (256, 512, 1024, 2048, 4096)
    if args.quick:
        args.arrivals = 12

    latency = [preemption_latency(mode, args) for mode in ("layer", "layer-restart", "iteration")]
    print(f"\n## Preemption latency: online arrival -> engine free ({args.offline_batch} offline requests, "
          f"{args.offline_prompt}-token prompts, {args.offline_output} tokens out)\n")
    print("| preemption | arrivals | P50 ms | P99 ms | mean ms | layer stops | resumed | layers discarded "
          "| offline tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in latency:
        print(f"| {r['mode']} | {r['arrivals']} | {r['p50_wait_ms']:.1f} | {r['p99_wait_ms']:.1f} | "
              f"{r['mean_wait_ms']:.1f} | {r['layer_stops']} | {r['resumed']} | {r['layers_discarded']} | "
              f"{r['offline_tok_s']:.0f} |")
    for r in latency:
        print(f"longest waits, {r['mode']}: {r['longest_waits']}")

    resume = [resume_cost(kv, c, args) for c in contexts for kv in ("checkpoint", "swap", "recompute")]
    print("\n## Preempt and resume one offline request\n")
    print("| context | offline KV | preempt ms | resume ms |")
    print("|---|---|---|---|")
    for r in resume:
        print(f"| {r['context']} | {r['offline_kv']} | {r['preempt_ms']:.1f} | {r['resume_ms']:.1f} |")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "latency": latency, "resume": resume}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
