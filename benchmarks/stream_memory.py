"""Memory a stream holds for a reader that does not read: deltas coalescing in one DeltaBuffer (what the
server does) against a queue of cumulative copies (what it did before admission control landed).

Each engine step appends one token (with logprobs: 5 alternatives) to a request's output; the reader
takes nothing until the end. Peak Python heap by tracemalloc, per stream, for several output lengths:
the copies grow with the square of the output, the buffer with the output.

    python benchmarks/stream_memory.py [--tokens 256,1024,4096] [--out results/stream_memory.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tracemalloc

from conserve.deltas import DeltaBuffer, DeltaTracker
from conserve.outputs import CompletionOutput, RequestOutput, TokenLogprobs


def cumulative_outputs(num_tokens: int):
    """The engine's view: after step k, the whole output so far (fresh lists, as the engine builds them)."""
    ids: list[int] = []
    lps: list[TokenLogprobs] = []
    text = ""
    for k in range(num_tokens):
        ids.append(k % 30000)
        lps.append(TokenLogprobs(k % 30000, -0.5, [(j, -1.0 - j) for j in range(5)]))
        text += " word"
        yield RequestOutput("r", None, [1, 2, 3], [CompletionOutput(0, text, list(ids), -0.5 * (k + 1), list(lps))],
                            k == num_tokens - 1)


def peak_bytes(num_tokens: int, coalesce: bool) -> int:
    async def run() -> None:
        tracker, buffer, queue = DeltaTracker(), DeltaBuffer(), asyncio.Queue()
        for out in cumulative_outputs(num_tokens):
            if coalesce:
                buffer.push(tracker.delta(out))
            else:
                queue.put_nowait(out)  # the old way: every step's cumulative copy waits in the queue
        if coalesce:
            await buffer.get()

    tracemalloc.start()
    asyncio.run(run())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="256,1024,4096", help="output lengths to try")
    p.add_argument("--out", default="results/stream_memory.json")
    args = p.parse_args()
    rows = []
    print("| output tokens | cumulative copies queued (MiB) | coalescing delta buffer (MiB) |")
    print("|---|---|---|")
    for n in (int(x) for x in args.tokens.split(",")):
        copies, deltas = peak_bytes(n, False) / 2**20, peak_bytes(n, True) / 2**20
        rows.append({"tokens": n, "copies_mib": round(copies, 2), "deltas_mib": round(deltas, 2)})
        print(f"| {n} | {copies:.1f} | {deltas:.2f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
