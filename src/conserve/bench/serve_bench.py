"""`conserve bench serve`: load an OpenAI-compatible server with timed online requests, optionally
beside a saturating offline load, and report latencies and throughput like `vllm bench serve`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from conserve.bench.config import DEFAULT_NUM_PROMPTS, ENDPOINTS, BenchConfig
from conserve.bench.metrics import parse_goodput, parse_percentiles

EPILOG = """\
Online arrivals follow a Gamma process (--burstiness 1 = Poisson) at --request-rate, or replay --trace,
an Azure LLM inference trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens). Prompts are seeded random
common English words: one word is about one token, exact with --tokenizer-json. Output lengths are
forced with max_tokens and ignore_eos. Exit status: 0 done, 1 no online request succeeded, 2 bad
arguments or an unreachable server."""


def add_bench_command(sub) -> None:
    bench = sub.add_parser("bench", help="benchmark a running OpenAI-compatible server")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    p = bench_sub.add_parser("serve", help="online latency and throughput under load, with optional offline load",
                             description=__doc__, epilog=EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    t = p.add_argument_group("target")
    t.add_argument("--base-url", metavar="URL", default="http://127.0.0.1:8000", help="server URL (default: %(default)s)")
    t.add_argument("--model", metavar="NAME", default=None, help="model name (default: the first id of GET /v1/models)")
    t.add_argument("--api-key", metavar="KEY", default=None, help="bearer token (default: $OPENAI_API_KEY or EMPTY)")
    t.add_argument("--endpoint", default="completions", choices=list(ENDPOINTS),
                   help="/v1/completions or /v1/chat/completions, streamed (default: %(default)s)")
    t.add_argument("--request-timeout", metavar="S", type=float, default=6 * 3600.0, help="seconds per request (default: 6 h)")
    w = p.add_argument_group("online workload")
    w.add_argument("--num-prompts", metavar="N", type=int, default=None,
                   help=f"online requests (default: {DEFAULT_NUM_PROMPTS}; with --trace, all its rows)")
    w.add_argument("--request-rate", metavar="R", type=float, default=None, help="requests/s; inf sends all at once (default)")
    w.add_argument("--burstiness", metavar="B", type=float, default=1.0,
                   help="Gamma shape of inter-arrival gaps: 1 Poisson, <1 burstier, >1 steadier")
    w.add_argument("--max-concurrency", metavar="N", type=int, default=None, help="most online requests in flight")
    w.add_argument("--seed", metavar="S", type=int, default=0, help="seed of arrivals, lengths and prompts")
    w.add_argument("--input-len", metavar="N", type=int, default=1024, help="prompt tokens (default: %(default)s)")
    w.add_argument("--output-len", metavar="N", type=int, default=128, help="generated tokens (default: %(default)s)")
    w.add_argument("--input-len-range-ratio", metavar="R", type=float, default=0.0,
                   help="prompt lengths uniform in input-len x [1-r, 1+r] (vLLM's --random-range-ratio)")
    w.add_argument("--trace", metavar="FILE.csv", default=None, help="replay this Azure-schema trace CSV instead of --request-rate")
    w.add_argument("--trace-rate-scale", metavar="X", type=float, default=1.0, help="arrival rate multiplier for --trace")
    w.add_argument("--max-input-len", metavar="N", type=int, default=None, help="clip prompt lengths (trace or synthetic)")
    w.add_argument("--max-output-len", metavar="N", type=int, default=None, help="clip output lengths (trace or synthetic)")
    w.add_argument("--tokenizer-json", metavar="PATH", default=None, help="HF tokenizer.json: make prompt lengths exact")
    o = p.add_argument_group("offline load (kept up for the whole online run)")
    o.add_argument("--offline-concurrency", metavar="K", type=int, default=0,
                   help="service_tier=flex requests kept in flight (default: 0, none)")
    o.add_argument("--offline-input-len", metavar="N", type=int, default=1024, help="offline prompt tokens (default: %(default)s)")
    o.add_argument("--offline-output-len", metavar="N", type=int, default=128, help="offline output tokens (default: %(default)s)")
    o.add_argument("--offline-batch", action="store_true",
                   help="offline load is one Batch API job (Files + Batches API) instead of flex requests")
    o.add_argument("--offline-batch-size", metavar="N", type=int, default=1000, help="lines of that job (default: %(default)s)")
    o.add_argument("--offline-batch-poll", metavar="S", type=float, default=1.0, help="seconds between batch status polls")
    r = p.add_argument_group("report")
    r.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:10000 (milliseconds)")
    r.add_argument("--percentiles", metavar="P,P,...", default="90,99",
                   help="latency percentiles besides mean and median (default: %(default)s; p90, p99 always)")
    r.add_argument("--output", default=None, metavar="FILE.json", help="write the full report as JSON")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench_serve)
    from conserve.bench.coserve import add_coserve_command

    add_coserve_command(bench_sub)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(base_url=args.base_url, model=args.model, api_key=args.api_key, endpoint=args.endpoint,
                       request_timeout_s=args.request_timeout, num_prompts=args.num_prompts,
                       request_rate=args.request_rate, burstiness=args.burstiness,
                       max_concurrency=args.max_concurrency, seed=args.seed, input_len=args.input_len,
                       output_len=args.output_len, input_len_range_ratio=args.input_len_range_ratio,
                       trace=args.trace, trace_rate_scale=args.trace_rate_scale, max_input_len=args.max_input_len,
                       max_output_len=args.max_output_len, tokenizer_json=args.tokenizer_json,
                       offline_concurrency=args.offline_concurrency, offline_input_len=args.offline_input_len,
                       offline_output_len=args.offline_output_len, offline_batch=args.offline_batch,
                       offline_batch_size=args.offline_batch_size, offline_batch_poll_s=args.offline_batch_poll,
                       goodput=parse_goodput(args.goodput or []), percentiles=parse_percentiles(args.percentiles),
                       quiet=args.quiet)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from conserve.bench.report import format_table
    from conserve.bench.runner import run_benchmark

    config = config_from_args(args)
    config.validate()  # before any network work: bad flags fail fast
    report = asyncio.run(run_benchmark(config))
    print(format_table(report, config.percentiles))
    if report["failed"]:
        print(f"conserve bench: {report['failed']} online request(s) failed; first errors:", file=sys.stderr)
        for e in report["errors"]:
            print(f"  {e}", file=sys.stderr)
    if report["offline_errors"]:
        print(f"conserve bench: {report['offline_failed']} offline request(s) failed; first errors:",
              file=sys.stderr)
        for e in report["offline_errors"]:
            print(f"  {e}", file=sys.stderr)
    for w in report["warnings"]:
        print(f"conserve bench: warning: {w}", file=sys.stderr)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0 if report["completed"] > 0 else 1
