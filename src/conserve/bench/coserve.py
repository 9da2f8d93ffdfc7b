"""`conserve bench coserve`: start each system in turn on the default model, run the same seeded workload
against it with run_benchmark, stop it; then one comparison table, the target checks, JSON and plots."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from conserve.bench.client import BenchError
from conserve.bench.compare import SystemResult, summarize_report
from conserve.bench.config import BenchConfig
from conserve.bench.coserve_results import write_results
from conserve.bench.runner import run_benchmark
from conserve.bench.servers import ServerError, ServerProcess, free_port
from conserve.bench.systems import (
    DEFAULT_HF_DIR,
    DEFAULT_VLLM_VENV,
    SYSTEMS,
    CoserveWorkload,
    LaunchContext,
    NotRunnable,
    System,
    select_systems,
)

QUICK = {"duration_s": 40.0, "offline_concurrency": 8}


@dataclass
class CoserveOptions:
    workload: CoserveWorkload = field(default_factory=CoserveWorkload)
    output_dir: str = "results"
    vllm_venv: str = DEFAULT_VLLM_VENV
    hf_dir: str = DEFAULT_HF_DIR
    conserve_args: list[str] = field(default_factory=list)
    server_timeout_s: float | None = None  # None: 300 s conserve, 600 s vLLM
    argv: list[str] = field(default_factory=lambda: list(sys.argv))

    def tokenizer_json(self) -> str | None:
        """The HF dir holds the served model's tokenizer: with it prompt lengths are exact."""
        path = os.path.join(os.path.expanduser(self.hf_dir), "tokenizer.json")
        return path if os.path.isfile(path) else None


def _log(msg: str) -> None:
    print(f"coserve: {msg}", file=sys.stderr, flush=True)


def add_coserve_command(bench_sub) -> None:
    p = bench_sub.add_parser("coserve", help="start each co-serving system in turn and compare them",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog="systems:\n" + "\n".join(f"  {s.name:<21} {s.description}"
                                                              for s in SYSTEMS.values()))
    d = CoserveWorkload()
    p.add_argument("--quick", action="store_true", help="40 s runs with offline concurrency 8")
    p.add_argument("--systems", metavar="A,B,...", default=None, help="run only these systems (default: all)")
    p.add_argument("--output-dir", metavar="DIR", default="results", help="where results go (default: %(default)s)")
    p.add_argument("--vllm-venv", metavar="DIR", default=DEFAULT_VLLM_VENV,
                   help="vLLM CPU virtualenv (scripts/setup_vllm_venv.sh; default: %(default)s)")
    p.add_argument("--hf-dir", metavar="DIR", default=DEFAULT_HF_DIR,
                   help="HF model directory vLLM serves; its tokenizer.json makes prompt lengths exact "
                        "(scripts/export_hf_dir.py; default: %(default)s)")
    p.add_argument("--conserve-arg", metavar="ARGS", action="append", default=[],
                   help="extra args for every conserve server, e.g. --conserve-arg='--latency-model PATH'")
    p.add_argument("--server-timeout", metavar="S", type=float, default=None,
                   help="seconds to wait for a server's /health (default: 300 conserve, 600 vLLM)")
    w = p.add_argument_group("workload (the same for every system)")
    dflt = " (default: %(default)s)"
    w.add_argument("--request-rate", metavar="R", type=float, default=d.request_rate, help="online req/s" + dflt)
    w.add_argument("--burstiness", metavar="B", type=float, default=d.burstiness,
                   help="Gamma shape of arrival gaps, 1 Poisson, <1 burstier" + dflt)
    w.add_argument("--input-len", metavar="N", type=int, default=d.input_len, help="online prompt tokens" + dflt)
    w.add_argument("--input-len-range-ratio", metavar="R", type=float, default=d.input_len_range_ratio,
                   help="prompt lengths uniform in input-len x [1-r, 1+r]" + dflt)
    w.add_argument("--output-len", metavar="N", type=int, default=d.output_len, help="online output tokens" + dflt)
    w.add_argument("--duration", metavar="S", type=float, default=None,
                   help=f"online arrivals span (default: {d.duration_s:g}; --quick {QUICK['duration_s']:g})")
    w.add_argument("--offline-concurrency", metavar="K", type=int, default=None,
                   help=f"flex requests in flight (default: {d.offline_concurrency}; "
                        f"--quick {QUICK['offline_concurrency']})")
    w.add_argument("--offline-input-len", metavar="N", type=int, default=d.offline_input_len,
                   help="offline prompt tokens" + dflt)
    w.add_argument("--offline-output-len", metavar="N", type=int, default=d.offline_output_len,
                   help="offline output tokens" + dflt)
    w.add_argument("--seed", metavar="S", type=int, default=d.seed, help="arrivals and prompts seed" + dflt)
    w.add_argument("--request-timeout", metavar="S", type=float, default=d.request_timeout_s,
                   help="a slower request counts as failed" + dflt)
    p.set_defaults(func=cmd_bench_coserve)


def options_from_args(args: argparse.Namespace) -> CoserveOptions:
    quick, d = (QUICK if args.quick else {}), CoserveWorkload()
    wl = CoserveWorkload(
        request_rate=args.request_rate, burstiness=args.burstiness, input_len=args.input_len,
        input_len_range_ratio=args.input_len_range_ratio, output_len=args.output_len,
        duration_s=args.duration if args.duration is not None else quick.get("duration_s", d.duration_s),
        offline_concurrency=(args.offline_concurrency if args.offline_concurrency is not None
                             else quick.get("offline_concurrency", d.offline_concurrency)),
        offline_input_len=args.offline_input_len, offline_output_len=args.offline_output_len, seed=args.seed,
        request_timeout_s=args.request_timeout)
    extra = [a for spec in args.conserve_arg for a in shlex.split(spec)]
    return CoserveOptions(wl, args.output_dir, args.vllm_venv, args.hf_dir, extra, args.server_timeout)


def cmd_bench_coserve(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    return run_coserve(opts, select_systems(args.systems))


def run_coserve(opts: CoserveOptions, systems: Sequence[System]) -> int:
    """Run the systems one after another; 0 if any ran, 1 if none did, 130 on Ctrl-C."""
    if not systems:
        raise ValueError("no systems selected")
    if not opts.workload.duration_s > 0:
        raise ValueError(f"--duration must be > 0, got {opts.workload.duration_s}")
    # bad workload flags fail before any server starts
    opts.workload.bench_config(SYSTEMS["conserve"], "http://127.0.0.1", opts.tokenizer_json()).validate()
    results: list[SystemResult] = []
    interrupted = False
    t0 = time.monotonic()
    for i, system in enumerate(systems, 1):
        if interrupted:
            results.append(SystemResult(system.name, system.description, "not run", "interrupted"))
            continue
        _log(f"[{i}/{len(systems)}] {system.name}: starting ({system.description})")
        try:
            res = run_system(system, opts)
        except KeyboardInterrupt:
            _log(f"{system.name}: interrupted; its server is stopped")
            res, interrupted = SystemResult(system.name, system.description, "interrupted", "Ctrl-C"), True
        results.append(res)
        what = f"{res.status}: {res.error.splitlines()[0]}" if res.error else res.status
        _log(f"[{i}/{len(systems)}] {system.name}: done, {what} ({res.elapsed_s:.0f} s; {time.monotonic() - t0:.0f} s "
             "in all)")
    write_results(opts, results)
    if interrupted:
        return 130
    return 0 if any(r.ok for r in results) else 1


def run_system(system: System, opts: CoserveOptions) -> SystemResult:
    t0 = time.monotonic()
    res = SystemResult(system.name, system.description, "failed")
    with tempfile.TemporaryDirectory(prefix=f"conserve-coserve-{system.name}-") as data_dir:
        log_path = os.path.join(opts.output_dir, "logs", f"coserve_{system.name}.log")
        ctx = LaunchContext(free_port(), data_dir, log_path, list(opts.conserve_args), opts.vllm_venv, opts.hf_dir,
                            opts.server_timeout_s)
        try:
            spec = system.launch(system, ctx)
        except NotRunnable as e:
            res.status, res.error = "not run", str(e)
            return res
        res.server_command, res.log_path = spec.argv, spec.log_path
        try:
            server = ServerProcess(spec)
            try:  # the server is stopped whatever happens, Ctrl-C included
                ready_s = server.wait_ready()
                _log(f"{system.name}: ready after {ready_s:.0f} s (log: {log_path}); warming up")
                asyncio.run(_warm_up(spec.base_url, opts.tokenizer_json()))
                config = opts.workload.bench_config(system, spec.base_url, opts.tokenizer_json())
                _log(f"{system.name}: running {config.num_prompts} online requests over ~"
                     f"{opts.workload.duration_s:g} s, offline concurrency {config.offline_concurrency}")
                report = asyncio.run(run_benchmark(config))
                died = server.exited()
            finally:
                server.stop()
        except Exception as e:  # noqa: BLE001 - one broken system must not lose the others' results
            expected = isinstance(e, (ServerError, BenchError))  # their messages are complete sentences
            res.error = str(e) if expected else f"{type(e).__name__}: {e}"
            res.elapsed_s = time.monotonic() - t0
            return res
    res.report, res.summary = report, summarize_report(report)
    res.elapsed_s = time.monotonic() - t0
    if report["completed"] == 0:
        res.error = "no online request succeeded: " + "; ".join(report["errors"])
    elif died is not None:
        res.error = f"the server exited with code {died} during the run"
    else:
        res.status = "ok"
    return res


async def _warm_up(base_url: str, tokenizer_json: str | None) -> None:
    """Two short requests so that first-request costs (allocations, compilation) are not measured."""
    report = await run_benchmark(BenchConfig(base_url=base_url, num_prompts=2, max_concurrency=1, input_len=16,
                                             output_len=4, tokenizer_json=tokenizer_json, quiet=True,
                                             request_timeout_s=300.0))
    if report["failed"]:
        _log(f"warning: {report['failed']} warm-up request(s) failed: {'; '.join(report['errors'])}")
