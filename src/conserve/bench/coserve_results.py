"""What `conserve bench coserve` leaves behind: the machine and load lines, the comparison table and target
lines on stdout, coserve.json (every system's summary, the targets, the command line, the machine and the
measured capacity), one full report per system (coserve_<system>.json), the plots and, for a sweep, the
trade-off table and figure."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from datetime import datetime, timezone

from conserve import machine
from conserve.bench.calibrate import Calibration
from conserve.bench.compare import SystemResult, check_targets, format_comparison, format_targets
from conserve.bench.coserve_options import CoserveOptions
from conserve.bench.tradeoff import LATENCY_LIMIT, OFFLINE_GOAL, TradeoffPoint, format_tradeoff


def machine_summary(calibration: Calibration | None) -> dict:
    """CPU model and ISA (timings compare only on the same ones), the platform, and the measured capacity."""
    return {**machine.machine_info(), "platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "calibration": dataclasses.asdict(calibration) if calibration else None}


def describe_run(info: dict, calibration: Calibration | None, request_rate: float) -> list[str]:
    """The lines heading the stdout table and the markdown: which machine, which online load."""
    load = calibration.describe() if calibration else f"online load {request_rate:g} req/s (fixed: --request-rate)"
    return [f"Machine: {info['cpu']}, ISA {info['isa']}, {info['cpus']} CPUs, {info['threads']} threads",
            load[0].upper() + load[1:]]


def write_results(opts: CoserveOptions, results: Sequence[SystemResult], calibration: Calibration | None = None,
                  points: Sequence[TradeoffPoint] | None = None) -> None:
    from conserve.bench.plots import write_plots  # matplotlib stays unimported until here

    os.makedirs(opts.output_dir, exist_ok=True)
    info = machine_summary(calibration)
    header = describe_run(info, calibration, opts.workload.request_rate)
    targets = check_targets({r.name: r.summary for r in results if r.ok})
    systems: dict[str, dict] = {}
    for r in results:
        entry = {"status": r.status, "description": r.description, "error": r.error,
                 "server_command": r.server_command, "log_file": r.log_path, "elapsed_s": r.elapsed_s, **r.summary}
        if r.report is not None:
            entry["report_file"] = _dump(os.path.join(opts.output_dir, f"coserve_{r.name}.json"), r.report)
        systems[r.name] = entry
    print("\n".join(header))
    print(format_comparison(results))
    print(format_targets(targets))
    plots, notes = write_plots(results, opts.output_dir)
    tradeoff = None
    if points is not None:
        tradeoff, more = write_tradeoff(points, opts.output_dir, "\n\n".join(header))
        notes += more
    for note in notes:
        print(f"coserve: {note}", file=sys.stderr)
    wl = dataclasses.asdict(opts.workload) | {"num_prompts": opts.workload.num_prompts}
    summary = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command_line": shlex.join(opts.argv),
               "argv": opts.argv, "machine": info, "workload": wl, "tokenizer_json": opts.tokenizer_json(),
               "conserve_args": opts.conserve_args, "systems": systems,
               "targets": [dataclasses.asdict(t) for t in targets], "plots": plots,
               "tradeoff": tradeoff}
    print(f"coserve: wrote {_dump(os.path.join(opts.output_dir, 'coserve.json'), summary)}", file=sys.stderr)


def _dump(path: str, data: dict) -> str:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    return path


def write_tradeoff(points: Sequence[TradeoffPoint], out_dir: str, header: str) -> tuple[dict, list[str]]:
    """Write coserve_tradeoff.md (header + table) and coserve_tradeoff.png; (the JSON entry, notes)."""
    from conserve.bench.plots import write_tradeoff_plot  # matplotlib stays unimported until here

    table = format_tradeoff(points)
    print(table)
    md_path = os.path.join(out_dir, "coserve_tradeoff.md")
    with open(md_path, "w") as f:
        f.write(f"# Co-serving trade-off\n\n{header}\n\n{table}\n")
    plot, notes = write_tradeoff_plot(points, out_dir, LATENCY_LIMIT, OFFLINE_GOAL)
    entry = {"points": [dataclasses.asdict(p) for p in points], "table_file": md_path, "plot_file": plot,
             "latency_limit": LATENCY_LIMIT, "offline_goal": OFFLINE_GOAL}
    return entry, notes
