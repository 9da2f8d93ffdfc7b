"""Prompt attention, one layer of the default model's shapes: the CPU prefill kernel
(`--prefill-attention kernel`, prefill_attention.cpp) against torch's scaled_dot_product_attention,
for whole prompts and chunks after a context, with the kernel's GFLOP/s (causal FLOPs only).

    python benchmarks/prefill_attention.py [--dtype bfloat16] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from conserve.bench.timing import call_times
from conserve.config import EngineConfig
from conserve.malloc_tuning import tune_malloc
from conserve.model import prefill_kernel

KV_HEADS, HEADS, D = 3, 9, 64
CASES = [(1024, 1024), (256, 1024), (64, 64), (16, 1100)]  # (chunk rows, context including them)


def sdpa(q, k, v):
    rows, ctx = q.shape[0], k.shape[1]
    mask = None if rows == ctx else torch.arange(ctx).unsqueeze(0) <= (torch.arange(rows) + ctx - rows).unsqueeze(1)
    return F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                          attn_mask=mask, is_causal=mask is None, enable_gqa=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not prefill_kernel.load(EngineConfig().kernel_cache_dir):
        raise SystemExit("the prefill kernel could not be built (see the log)")
    dtype = getattr(torch, args.dtype)
    rows_out = []
    print(f"| rows | context | sdpa ms | kernel ms | kernel GFLOP/s |  ({args.dtype}, {torch.get_num_threads()} threads)")
    print("|---|---|---|---|---|")
    for rows, ctx in CASES:
        q = torch.randn(rows, HEADS, D).to(dtype)
        k, v = torch.randn(KV_HEADS, ctx, D).to(dtype), torch.randn(KV_HEADS, ctx, D).to(dtype)
        torch_ms = min(call_times(lambda: sdpa(q, k, v), args.repeats)) * 1e3
        kernel_ms = min(call_times(lambda: torch.ops.conserve.prefill_attention(q, k, v, D ** -0.5),
                                   args.repeats)) * 1e3
        flops = 2 * 2 * HEADS * D * (rows * ctx - rows * rows / 2)
        rows_out.append({"rows": rows, "context": ctx, "sdpa_ms": torch_ms, "kernel_ms": kernel_ms,
                         "kernel_gflops": flops / kernel_ms / 1e6})
        print(f"| {rows} | {ctx} | {torch_ms:.3f} | {kernel_ms:.3f} | {flops / kernel_ms / 1e6:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "threads": torch.get_num_threads(), "cases": rows_out}, f, indent=2)


if __name__ == "__main__":
    main()
