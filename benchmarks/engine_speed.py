"""Engine speed before/after a switch, interleaved: each configuration runs in its own process, in
rounds (A B C, A B C, ...), so a noisy shared machine disturbs all of them alike; medians reported.

Each run uses `--scheduler fcfs` unless its flags say otherwise. Per run: single stream (one chat x
64 tokens, decode tok/s), 32 chats x 64 tokens (generated tok/s), and a 1024-token prompt's prefill
(1 output token, seconds). Configurations are engine flags:

    python benchmarks/engine_speed.py --rounds 3 \\
        --config "gather:--attention gather" --config "kernel:--attention kernel" \\
        --config "kernel+compile:--attention kernel --compile on" [--json results/engine_speed.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE / "peers")]


def one_run(flags: list[str]) -> dict:
    import torch
    import workload as wl

    from conserve import LLM, SamplingParams
    from conserve.config import EngineConfig
    from conserve.flags import add_flags, from_flags

    parser = argparse.ArgumentParser()  # the engine flags of `conserve serve`
    add_flags(parser, EngineConfig)
    # fcfs unless asked: the co-serving scheduler would profile a latency model at a first start.
    config = from_flags(EngineConfig, parser.parse_args(["--scheduler", "fcfs", *flags]))
    started = time.perf_counter()
    llm = LLM(**dataclasses.asdict(config))
    out = {"startup_s": time.perf_counter() - started, "threads": torch.get_num_threads(),
           "dtype": str(llm.engine.runner.model.dtype)}
    greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731
    llm.chat(wl.conversations(4), greedy(8), use_tqdm=False)  # warm-up
    one = [wl.single_stream_conversation()]
    llm.chat(one, greedy(1), use_tqdm=False)
    t = time.perf_counter()
    llm.chat(one, greedy(1), use_tqdm=False)
    ttft = time.perf_counter() - t
    t = time.perf_counter()
    llm.chat(one, greedy(65), use_tqdm=False)
    out["single_decode_tok_s"] = 64 / (time.perf_counter() - t - ttft)
    t = time.perf_counter()
    res = llm.chat(wl.conversations(32), greedy(64), use_tqdm=False)
    out["batch32_gen_tok_s"] = sum(len(r.outputs[0].token_ids) for r in res) / (time.perf_counter() - t)
    prompt = [1] + [(37 * i) % 40000 + 100 for i in range(1023)]
    llm.generate({"prompt_token_ids": prompt[:64]}, greedy(1), use_tqdm=False)
    t = time.perf_counter()
    llm.generate({"prompt_token_ids": prompt}, greedy(1), use_tqdm=False)
    out["prefill1024_s"] = time.perf_counter() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", action="append", required=False, help="NAME:FLAGS")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: run these flags once
    args = ap.parse_args()
    if args.one is not None:
        print("RESULT " + json.dumps(one_run(shlex.split(args.one))), flush=True)
        return
    configs = [c.split(":", 1) for c in (args.config or ["default:"])]
    runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
    for r in range(args.rounds):
        for name, flags in configs:
            done = subprocess.run([sys.executable, __file__, "--one", flags], capture_output=True, text=True,
                                  env=os.environ, check=False)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                print(f"{name}: run failed\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            runs[name].append(json.loads(lines[-1][7:]))
            print(f"round {r + 1} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    keys = ("single_decode_tok_s", "batch32_gen_tok_s", "prefill1024_s", "startup_s")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    import torch

    print(f"CPU {cpu} ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, "
          f"{args.rounds} interleaved rounds, medians (min-max)")
    print("| config | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    summary = {}
    for name, _ in configs:
        vals = {k: [run[k] for run in runs[name]] for k in keys}
        summary[name] = {k: statistics.median(v) for k, v in vals.items() if v}
        cells = [f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" if v else "-" for v in vals.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"cpu": cpu, "configs": dict(configs), "runs": runs,
                                               "medians": summary}, indent=1))


if __name__ == "__main__":
    main()
