"""`conserve profile`: measure this machine's iteration times and cache the fitted latency model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from conserve.config import EngineConfig


def add_profile_command(sub, parents) -> None:
    p = sub.add_parser("profile", parents=parents,
                       help="time the model over a (P, C) grid and fit the latency model T(P, C)")
    p.add_argument("--quick", action="store_true", help="a coarser grid (about a minute on 2 cores)")
    p.add_argument("--output", default=None, help="also write the full report (samples, errors) as JSON")
    EngineConfig.add_flags(p)
    p.set_defaults(func=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    from conserve.engine import Engine
    from conserve.profiler import profile

    # Profiling drives the runner directly: no latency model needed to start.
    config = EngineConfig.from_flags(args, scheduler="fcfs")
    engine = Engine(config)

    def progress(done: int, total: int) -> None:
        sys.stderr.write(f"\rprofiling {done}/{total}")
        sys.stderr.flush()

    model, report = profile(engine, quick=args.quick, progress=progress)
    sys.stderr.write("\n")
    path = engine.latency_cache_path()
    model.save(path)
    print("| P (tokens) | D (decode reads) | R (prefill reads) | measured ms | predicted ms |")
    print("|---|---|---|---|---|")
    for s in report["samples"]:
        print(f"| {s['P']} | {s['D']} | {s['R']} | {s['ms']:.2f} | {s['predicted_ms']:.2f} |")
    print(f"\nheld-out points: {report['held_out']}, median |relative error| "
          f"{report['median_abs_rel_error']:.1%}, max {report['max_abs_rel_error']:.1%}")
    print(f"latency model written to {path}")
    if args.output:
        Path(args.output).write_text(json.dumps({**report, "model": model.to_json()}, indent=2))
    return 0
