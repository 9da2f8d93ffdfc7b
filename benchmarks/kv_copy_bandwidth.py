"""KV checkpoint and prefetch bandwidth of the block copier (kv/block_copier.py), in GB/s.

    python benchmarks/kv_copy_bandwidth.py [--device cuda] [--shape llama-3.1-8b] [--output results/copy.json]

A device KV cache and a host tier of the model shape's blocks (Llama-3.1-8B: 32 layers x 8 KV heads x
128 x bfloat16, 2 MiB per 16-token block), then jobs of --job-blocks blocks each: checkpoints (device
-> pinned host) and prefetches (host -> device), to consecutive and to scattered host blocks, timed
from submission until the job is done (its event) and reported as bytes moved per second. On CPU the
copies run inline (a check of the plumbing, not of a GPU's copy engines).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from conserve.kv.block_copier import BlockCopier, BlockHostCache
from conserve.kv.copy_job import CopyJob, Segment
from conserve.kv.copy_queue import queue_for
from conserve.model.attention import KVCache
from conserve.model.config import ModelConfig
from conserve.model.dummy import shipped_config
from conserve.request import Request
from conserve.sampling_params import SamplingParams


def job(kind: str, device_blocks: list[int], host_blocks: list[int], block_size: int) -> CopyJob:
    request = Request("bench", [1], SamplingParams())
    return CopyJob(kind, [Segment(request, 0, len(device_blocks) * block_size, device_blocks, host_blocks, 0)])


def timed_jobs(copier: BlockCopier, jobs: list[CopyJob], sync) -> float:
    """Seconds from the first submission until every job is done."""
    sync()
    started = time.perf_counter()
    for j in jobs:
        copier.submit(j)
    for j in jobs:
        copier.wait(j)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="llama-3.1-8b", help="a shipped config (model/configs)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=1024, help="device and host blocks")
    ap.add_argument("--job-blocks", type=int, default=64)
    ap.add_argument("--jobs", type=int, default=8, help="jobs in flight per measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    c = ModelConfig.from_hf(shipped_config(args.shape), args.shape)
    kv = KVCache(c.num_layers, args.blocks, args.block_size, c.num_kv_heads, c.head_dim, dtype, device)
    queue = queue_for(device)
    host = BlockHostCache(kv, args.blocks, queue)
    copier = BlockCopier(kv, host, queue)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    block_bytes = KVCache.bytes_per_block(c.num_layers, args.block_size, c.num_kv_heads, c.head_dim, dtype)
    rng = random.Random(0)
    n = min(args.job_blocks * args.jobs, args.blocks)
    per_job = max(1, n // args.jobs)
    results = {}
    for layout in ("consecutive", "scattered"):
        for kind in ("checkpoint", "prefetch"):
            seconds = []
            for _ in range(args.repeats + 1):  # the first is a warm-up
                dev = rng.sample(range(args.blocks), n)
                hst = list(range(n)) if layout == "consecutive" else rng.sample(range(args.blocks), n)
                jobs = [job(kind, dev[i:i + per_job], hst[i:i + per_job], args.block_size)
                        for i in range(0, n, per_job)]
                seconds.append(timed_jobs(copier, jobs, sync))
            s = statistics.median(seconds[1:])
            results[f"{kind}_{layout}_gb_s"] = round(n * block_bytes / s / 1e9, 2)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "shape": args.shape,
              "dtype": args.dtype, "block_bytes": block_bytes, "blocks_per_job": per_job, "jobs": args.jobs,
              **results}
    print(json.dumps(report, indent=1))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
