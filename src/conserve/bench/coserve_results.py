"""What `conserve bench coserve` leaves behind: the comparison table and target lines on stdout,
coserve.json (every system's summary, the targets, the command line, the machine), one full report per
system (coserve_<system>.json) and the plots."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from conserve.bench.compare import SystemResult, check_targets, format_comparison, format_targets

if TYPE_CHECKING:
    from conserve.bench.coserve import CoserveOptions


def machine_info() -> dict:
    return {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "python": platform.python_version(), "cpu_count": os.cpu_count()}


def write_results(opts: CoserveOptions, results: Sequence[SystemResult]) -> None:
    from conserve.bench.plots import write_plots  # matplotlib stays unimported until here

    os.makedirs(opts.output_dir, exist_ok=True)
    targets = check_targets({r.name: r.summary for r in results if r.ok})
    systems: dict[str, dict] = {}
    for r in results:
        entry = {"status": r.status, "description": r.description, "error": r.error,
                 "server_command": r.server_command, "log_file": r.log_path, "elapsed_s": r.elapsed_s, **r.summary}
        if r.report is not None:
            entry["report_file"] = _dump(os.path.join(opts.output_dir, f"coserve_{r.name}.json"), r.report)
        systems[r.name] = entry
    print(format_comparison(results))
    print(format_targets(targets))
    plots, notes = write_plots(results, opts.output_dir)
    for note in notes:
        print(f"coserve: {note}", file=sys.stderr)
    wl = dataclasses.asdict(opts.workload) | {"num_prompts": opts.workload.num_prompts}
    summary = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command_line": shlex.join(opts.argv),
               "argv": opts.argv, "machine": machine_info(), "workload": wl, "tokenizer_json": opts.tokenizer_json(),
               "conserve_args": opts.conserve_args, "systems": systems,
               "targets": [dataclasses.asdict(t) for t in targets], "plots": plots}
    print(f"coserve: wrote {_dump(os.path.join(opts.output_dir, 'coserve.json'), summary)}", file=sys.stderr)


def _dump(path: str, data: dict) -> str:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    return path
