"""Decode attention over the paged KV cache, one layer of the default model's shapes: the in-place
kernel (`--attention kernel`) against the padded gather (`--attention gather`).

A long context among short ones should cost its own share only: the table shows 32 short decodes,
31 short + 1 long, the long one alone, and the extra time the long one adds to the batch next to
what it costs alone. Metadata is built by the runner's own code; block tables are shuffled.

    python benchmarks/paged_attention.py [--short 128] [--long 4096] [--dtype bfloat16] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from types import SimpleNamespace

import torch

from conserve.bench.timing import call_times
from conserve.config import EngineConfig
from conserve.malloc_tuning import tune_malloc
from conserve.model import paged_kernel
from conserve.model.attention import AttentionMetadata, KVCache, paged_attention
from conserve.runner import ModelRunner

KV_HEADS, HEADS, D, BS = 3, 9, 64, 16


def batch(lengths: list[int], num_blocks: int, rng: random.Random) -> list[SimpleNamespace]:
    free = list(range(num_blocks))
    rng.shuffle(free)
    out = []
    for n in lengths:
        blocks = -(-n // BS)
        out.append(SimpleNamespace(start=n - 1, block_table=free[:blocks]))
        free = free[blocks:]
    return out


def timed(fn, repeats: int) -> float:
    """Median milliseconds per call."""
    return statistics.median(call_times(fn, repeats)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", type=int, default=128)
    ap.add_argument("--long", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_malloc()
    dtype = getattr(torch, args.dtype)
    kernel = paged_kernel.load(EngineConfig().kernel_cache_dir)
    total = (args.batch * args.short + args.long) // BS + 2 * args.batch + 64
    kv = KVCache(1, total, BS, KV_HEADS, D, dtype, torch.device("cpu"))
    kv.k[0].copy_(torch.randn_like(kv.k[0], dtype=torch.float32))
    kv.v[0].copy_(torch.randn_like(kv.v[0], dtype=torch.float32))
    rng = random.Random(0)
    cases = {f"{args.batch} x {args.short}": [args.short] * args.batch,
             f"{args.batch - 1} x {args.short} + 1 x {args.long}": [args.short] * (args.batch - 1) + [args.long],
             f"1 x {args.long}": [args.long], f"1 x {args.short}": [args.short]}
    model = SimpleNamespace(device=torch.device("cpu"), dtype=dtype, config=SimpleNamespace(num_kv_heads=KV_HEADS))
    rows = {}
    with torch.inference_mode():
        for name, lengths in cases.items():
            decodes = batch(lengths, total, rng)
            q = torch.randn(len(lengths), HEADS, D).to(dtype)
            k = torch.zeros(len(lengths), KV_HEADS, D, dtype=dtype)
            slots = torch.tensor([s.block_table[s.start // BS] * BS + s.start % BS for s in decodes])
            row = {}
            for path in (["kernel"] if kernel else []) + ["gather"]:
                runner = ModelRunner(model, kv, paged_kernel=path == "kernel")
                meta = AttentionMetadata(kv.rows(slots), len(lengths), None, None, [])
                if path == "kernel":
                    runner._decode_tables(decodes, meta)
                else:
                    meta.decode_slots, meta.decode_bias = runner._decode_context(decodes)
                row[path] = round(timed(lambda m=meta: paged_attention(q, k, k, kv.k[0], kv.v[0], m),
                                        args.repeats), 3)
            rows[name] = row
    names = list(cases)
    paths = list(rows[names[0]])
    print(f"decode attention, one layer ({KV_HEADS} KV heads x {HEADS} heads x {D}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}), median ms")
    print("| batch | " + " | ".join(paths) + " |\n|---|" + "---|" * len(paths))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{rows[name][p]:.3f}" for p in paths) + " |")
    for p in paths:
        added = rows[names[1]][p] - rows[names[0]][p]
        alone = rows[names[2]][p] - rows[names[3]][p]
        print(f"{p}: the long context adds {added:.3f} ms to the batch; alone it costs {alone:.3f} ms more "
              f"than a short one (ratio {added / alone if alone > 0 else float('nan'):.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "threads": torch.get_num_threads(), "ms": rows}, f, indent=1)


if __name__ == "__main__":
    main()
