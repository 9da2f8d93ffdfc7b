"""Scale out on one machine: two engine replicas of one torch thread each (Ray Serve, harvest-aware
routing) against one engine of two threads, on `conserve bench coserve`'s co-serving workload.

Each system is started, warmed up, run on the same seeded workload (bursty online chats plus offline
flex requests kept in flight) and stopped, one after another, by conserve.bench.coserve's runner; the
table has online P99 TTFT/TPOT/ITL and online, offline and total tokens/s. The systems:

  single-2t   `conserve serve` as always: one process, torch's two threads (the reference)
  ray-1x2t    one replica of two threads behind the Ray Serve ingress (what the ingress hop costs)
  ray-2x1t    two replicas of one thread each behind the ingress

Every `conserve bench coserve` workload flag applies (--quick, --duration, --request-rate,
--load-fraction, --offline-concurrency, ...), as do --output-dir and --conserve-arg; --systems picks
among the three. A short smoke run:

    python benchmarks/scale_out.py --quick --duration 20 --offline-concurrency 4 --output-dir /tmp/scale_out

The comparison is of equal CPU: threads x replicas = 2 in every system. It needs `pip install
"conserve[ray]"` for the ray-* rows (they read "failed" with Ray's import error otherwise).
"""

from __future__ import annotations

import argparse
import sys

from conserve.bench.coserve import add_coserve_command, options_from_args, run_coserve
from conserve.bench.systems import System, conserve_launch

SYSTEMS = {s.name: s for s in (
    System("single-2t", "one process, two torch threads (no Ray)", conserve_launch),
    System("ray-1x2t", "one replica of two threads behind the Ray Serve ingress", conserve_launch,
           ("--ray-address", "local", "--replicas", "1", "--replica-threads", "2")),
    System("ray-2x1t", "two replicas of one thread each behind the Ray Serve ingress", conserve_launch,
           ("--replicas", "2", "--replica-threads", "1")),
)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scale_out.py")
    add_coserve_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["coserve", *argv])
    names = [n.strip() for n in (args.systems or ",".join(SYSTEMS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    return run_coserve(options_from_args(args), [SYSTEMS[n] for n in names])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
