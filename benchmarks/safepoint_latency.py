"""Safepoint stop latency: how long an online arrival waits for an offline-only iteration to stop between
layers, measured as the engine records it (arrival -> the device has finished the layers issued
before the stop; layer_progress.py), P50/P99 in ms.

    python benchmarks/safepoint_latency.py [--device cuda] [--model llama-3.1-8b] [--output results/sp.json]

The engine thread runs a steady offline batch (dummy weights of --model's shape: no weights needed);
the main thread signals online arrivals at random times (no request is added, so each stopped
iteration resumes at once and the offline batch stays the same). Also reports the device time per
layer of those iterations, the unit the latency should be a small multiple of.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from pathlib import Path

import torch

from conserve.bench.metrics import percentile
from conserve.config import EngineConfig
from conserve.engine import Engine
from conserve.request import RequestClass
from conserve.sampling_params import SamplingParams
from conserve.sched.latency_model import LatencyModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="llama-3.1-8b", help="a shipped config name or a config.json (dummy weights)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--offline", type=int, default=32, help="offline requests decoding together")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--arrivals", type=int, default=100)
    ap.add_argument("--interval", type=float, default=0.05, help="mean seconds between arrivals")
    ap.add_argument("--lookahead", type=int, default=1, help="--safepoint-lookahead")
    ap.add_argument("--kv-cache-gb", type=float, default=8.0)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    config = EngineConfig(model=args.model, load_format="dummy", device=args.device, dtype=args.dtype,
                          kv_cache_gb=args.kv_cache_gb, max_model_len=args.prompt + 2048, offline_kv="recompute",
                          safepoint_lookahead=args.lookahead, max_offline_batched_tokens=args.offline * args.prompt)
    # Iteration sizing is not what is measured: a fixed model that makes every offline batch welcome.
    engine = Engine(config, latency_model=LatencyModel([1e-3, 1e-6, 0.0, 1e-9, 0.0, 0.0]))
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=2048, ignore_eos=True)
    for i in range(args.offline):
        engine.add_request(f"off{i}", [rng.randrange(3, 256) for _ in range(args.prompt)], params,
                           RequestClass.OFFLINE)
    for _ in range(3):  # past the prefills: a steady decode batch
        engine.step()
    stop = threading.Event()
    layer_times: list[float] = []

    cuda = torch.device(args.device).type == "cuda"

    def loop() -> None:
        while not stop.is_set():
            stops, begin = engine.preemption.num_preemptions, time.perf_counter()
            engine.step(engine.preemption.arrivals)
            if cuda:
                torch.cuda.synchronize()
            if engine.preemption.num_preemptions == stops and engine._suspended is None:  # a whole iteration
                layer_times.append((time.perf_counter() - begin) / engine.runner.num_layers)

    thread = threading.Thread(target=loop, name="engine")
    thread.start()
    time.sleep(1.0)
    for _ in range(args.arrivals):
        time.sleep(rng.uniform(0.5, 1.5) * args.interval)
        engine.preemption.online_arrival(16)
    time.sleep(0.5)
    stop.set()
    thread.join()
    stops = [s * 1000 for s in engine.preemption.latencies]
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "model": args.model, "dtype": args.dtype, "offline_batch": args.offline, "lookahead": args.lookahead,
              "arrivals": args.arrivals, "stops": len(stops),
              "stop_ms_p50": round(percentile(stops, 50), 3) if stops else None,
              "stop_ms_p99": round(percentile(stops, 99), 3) if stops else None,
              "stop_ms_max": round(max(stops), 3) if stops else None,
              "layer_ms_median": round(statistics.median(layer_times) * 1000, 3) if layer_times else None}
    print(json.dumps(report, indent=1))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
