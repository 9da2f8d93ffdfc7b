"""`conserve bench coserve`: start each system in turn on the default model, run the same seeded workload
against it with run_benchmark, stop it; then one comparison table, the target checks, JSON and plots.
--load-fraction first measures the machine's online capacity (calibrate.py); --sweep-slo-tbt-ms runs the
systems' knob variants and reports the latency/throughput trade-off (sweep.py, tradeoff.py)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from conserve.bench.calibrate import (
    CALIBRATION_SYSTEM,
    DEFAULT_BURST,
    DEFAULT_LOAD_FRACTION,
    Calibration,
    CalibrationError,
    burst_config,
    calibration_from,
)
from conserve.bench.client import BenchError
from conserve.bench.compare import SystemResult, summarize_report
from conserve.bench.config import BenchConfig
from conserve.bench.coserve_options import CoserveOptions
from conserve.bench.coserve_results import write_results
from conserve.bench.runner import run_benchmark
from conserve.bench.servers import ServerError, ServerProcess, free_port
from conserve.bench.sweep import DEFAULT_SLOWDOWNS, DEFAULT_TOKEN_BUDGETS, SWEEP_SYSTEMS, expand_sweep, parse_number_list
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
from conserve.bench.tradeoff import tradeoff_points

QUICK = {"duration_s": 40.0, "offline_concurrency": 8}


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
    p.add_argument("--sweep-slo-tbt-ms", metavar="A,B,...", default=None,
                   help="trade-off sweep: conserve once per TBT SLO, sarathi once per --sweep-token-budgets "
                        "value, the others once; writes coserve_tradeoff.md/.png (default systems: "
                        f"{','.join(SWEEP_SYSTEMS)})")
    p.add_argument("--sweep-token-budgets", metavar="A,B,...", default=",".join(map(str, DEFAULT_TOKEN_BUDGETS)),
                   help="sarathi's token budgets in a sweep (default: %(default)s)")
    p.add_argument("--sweep-online-slowdown", metavar="A,B,...", default=",".join(map(str, DEFAULT_SLOWDOWNS)),
                   help="conserve-slowdown's --max-online-slowdown values in a sweep (default: %(default)s)")
    w = p.add_argument_group("workload (the same for every system)")
    dflt = " (default: %(default)s)"
    w.add_argument("--request-rate", metavar="R", type=float, default=None,
                   help=f"online req/s (default: {d.request_rate:g}); overrides --load-fraction")
    w.add_argument("--load-fraction", metavar="F", type=float, nargs="?", const=DEFAULT_LOAD_FRACTION, default=None,
                   help="first measure this machine's online capacity (a burst to online-only), then run every "
                        f"system at F x capacity req/s (F default {DEFAULT_LOAD_FRACTION:g})")
    w.add_argument("--calibration-requests", metavar="N", type=int, default=DEFAULT_BURST,
                   help="online requests in the capacity burst" + dflt)
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
    explicit_rate = args.request_rate is not None
    if explicit_rate and args.load_fraction is not None:
        _log("--request-rate is given: --load-fraction is ignored (no capacity measurement)")
    wl = CoserveWorkload(
        request_rate=args.request_rate if explicit_rate else d.request_rate, burstiness=args.burstiness,
        input_len=args.input_len, input_len_range_ratio=args.input_len_range_ratio, output_len=args.output_len,
        duration_s=args.duration if args.duration is not None else quick.get("duration_s", d.duration_s),
        offline_concurrency=(args.offline_concurrency if args.offline_concurrency is not None
                             else quick.get("offline_concurrency", d.offline_concurrency)),
        offline_input_len=args.offline_input_len, offline_output_len=args.offline_output_len, seed=args.seed,
        request_timeout_s=args.request_timeout)
    extra = [a for spec in args.conserve_arg for a in shlex.split(spec)]
    sweep = parse_number_list("--sweep-slo-tbt-ms", args.sweep_slo_tbt_ms) if args.sweep_slo_tbt_ms else []
    return CoserveOptions(wl, args.output_dir, args.vllm_venv, args.hf_dir, extra, args.server_timeout,
                          load_fraction=None if explicit_rate else args.load_fraction,
                          calibration_requests=args.calibration_requests, sweep_slo_tbt_ms=sweep,
                          sweep_token_budgets=parse_number_list("--sweep-token-budgets", args.sweep_token_budgets,
                                                                int),
                          sweep_online_slowdown=parse_number_list("--sweep-online-slowdown",
                                                                  args.sweep_online_slowdown))


def cmd_bench_coserve(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    default = ",".join(SWEEP_SYSTEMS) if opts.sweeping else None
    return run_coserve(opts, select_systems(args.systems or default))


def run_coserve(opts: CoserveOptions, systems: Sequence[System]) -> int:
    """Measure the capacity if asked, then run the systems (a sweep's variants included) one after another;
    0 if any ran, 1 if none did or the capacity could not be measured, 130 on Ctrl-C."""
    if not systems:
        raise ValueError("no systems selected")
    if not opts.workload.duration_s > 0:
        raise ValueError(f"--duration must be > 0, got {opts.workload.duration_s}")
    if opts.load_fraction is not None and not opts.load_fraction > 0:
        raise ValueError(f"--load-fraction must be > 0, got {opts.load_fraction}")
    if not opts.calibration_requests >= 1:
        raise ValueError(f"--calibration-requests must be >= 1, got {opts.calibration_requests}")
    # bad workload flags fail before any server starts
    opts.workload.bench_config(SYSTEMS["conserve"], "http://127.0.0.1", opts.tokenizer_json()).validate()
    if opts.sweeping:
        systems = expand_sweep(systems, opts.sweep_slo_tbt_ms, opts.sweep_token_budgets, opts.sweep_online_slowdown)
    calibration = None
    if opts.load_fraction is not None:
        try:
            calibration = calibrate_load(opts, systems)
        except CalibrationError as e:
            _log(str(e))
            return 1
        _log(calibration.describe())
        opts = dataclasses.replace(opts, workload=dataclasses.replace(opts.workload,
                                                                      request_rate=calibration.request_rate))
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
    points = tradeoff_points(list(zip(systems, results))) if opts.sweeping else None
    write_results(opts, results, calibration, points)
    if interrupted:
        return 130
    return 0 if any(r.ok for r in results) else 1


def calibrate_load(opts: CoserveOptions, systems: Sequence[System]) -> Calibration:
    """Burst the online-only system (the one in `systems` if there, so a test's launcher is used)."""
    base = next((s for s in systems if s.name == CALIBRATION_SYSTEM), SYSTEMS[CALIBRATION_SYSTEM])
    system = dataclasses.replace(base, name="calibration")  # its own log file
    _log(f"calibration: measuring the online capacity with {opts.calibration_requests} requests at once to "
         f"{CALIBRATION_SYSTEM}")
    res = run_system(system, opts, lambda url: burst_config(opts.workload, system, url, opts.tokenizer_json(),
                                                            opts.calibration_requests))
    return calibration_from(res, opts.load_fraction, opts.calibration_requests)


def run_system(system: System, opts: CoserveOptions,
               bench_config: Callable[[str], BenchConfig] | None = None) -> SystemResult:
    """Start the system, warm it up, run bench_config(base_url) (default: the comparison workload), stop it."""
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
                config = (bench_config(spec.base_url) if bench_config
                          else opts.workload.bench_config(system, spec.base_url, opts.tokenizer_json()))
                when = "all at once" if config.request_rate is None else f"at {config.request_rate:g} req/s"
                _log(f"{system.name}: running {config.num_prompts} online requests {when}, offline concurrency "
                     f"{config.offline_concurrency}")
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
