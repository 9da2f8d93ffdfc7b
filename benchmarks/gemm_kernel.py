"""conserve's bfloat16 matmul kernel (`--gemm-kernel auto`, gemm_bf16.cpp) against oneDNN's prepacked
matmul (`--gemm-kernel off`), on the default model's projection shapes.

Two settings: "from memory" runs one pass over 30 layers' projections (~200 MB of weights, as a decode
step streams them), "in cache" repeats one projection (its weight stays in L2/L3). The two kernels
alternate round by round, so a busy VM slows both alike; medians are reported, with GFLOP/s and the
weight bytes each read per second.

    python benchmarks/gemm_kernel.py [--rows 1,8,32,64,256,1024] [--rounds 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from conserve.config import EngineConfig
from conserve.machine import cpu_flags, cpu_model
from conserve.model import gemm_kernel
from conserve.model.gemm_kernel import PanelWeight

# SmolLM2-135M: fused q/k/v, o, fused gate/up, down ([N, K]).
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LAYERS = 30


def onednn(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, 32)


def run_onednn(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def alternate(calls: dict[str, callable], rounds: int) -> dict[str, float]:
    """Median seconds of each call, the calls alternating in order and reverse order."""
    times = {name: [] for name in calls}
    for name, call in calls.items():
        call()  # warm-up
    for r in range(rounds):
        for name in (list(calls) if r % 2 == 0 else list(reversed(calls))):
            started = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,32,64,256,1024")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()
    if not gemm_kernel.load(EngineConfig().kernel_cache_dir):
        raise SystemExit("the bfloat16 matmul kernel needs AVX512-BF16 and a C++ compiler")
    torch.manual_seed(0)
    layers = [[torch.randn(*s).to(torch.bfloat16) * 0.05 for s in SHAPES] for _ in range(LAYERS)]
    ours = [[PanelWeight(w) for w in layer] for layer in layers]
    theirs = [[onednn(w) for w in layer] for layer in layers]
    weight_bytes = LAYERS * sum(2 * n * k for n, k in SHAPES)
    print(f"{cpu_model()} ({'+'.join(f for f in ('avx512_bf16', 'avx512f', 'avx2') if f in cpu_flags())}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| rows | setting | conserve ms | oneDNN ms | conserve GFLOP/s | oneDNN GFLOP/s | conserve weight GB/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(rows, k).to(torch.bfloat16) for _, k in SHAPES}
        flops = LAYERS * sum(2 * rows * n * k for n, k in SHAPES)

        def pass_ours() -> None:
            for layer in ours:
                for (_, k), w in zip(SHAPES, layer):
                    w.matmul(xs[k])

        def pass_theirs() -> None:
            for layer in theirs:
                for (_, k), w in zip(SHAPES, layer):
                    run_onednn(xs[k], w)

        # In cache: layer 0's projections, repeated as often as a from-memory pass runs them.
        def cached_ours() -> None:
            for _ in range(LAYERS):
                for (_, k), w in zip(SHAPES, ours[0]):
                    w.matmul(xs[k])

        def cached_theirs() -> None:
            for _ in range(LAYERS):
                for (_, k), w in zip(SHAPES, theirs[0]):
                    run_onednn(xs[k], w)

        for setting, calls in (("from memory", {"conserve": pass_ours, "onednn": pass_theirs}),
                               ("in cache", {"conserve": cached_ours, "onednn": cached_theirs})):
            t = alternate(calls, args.rounds)
            row = {"rows": rows, "setting": setting, "conserve_ms": t["conserve"] * 1e3, "onednn_ms": t["onednn"] * 1e3,
                   "conserve_gflops": flops / t["conserve"] / 1e9, "onednn_gflops": flops / t["onednn"] / 1e9,
                   "conserve_weight_gbs": weight_bytes / t["conserve"] / 1e9, "speedup": t["onednn"] / t["conserve"]}
            results.append(row)
            print(f"| {rows} | {setting} | {row['conserve_ms']:.2f} | {row['onednn_ms']:.2f} | "
                  f"{row['conserve_gflops']:.0f} | {row['onednn_gflops']:.0f} | {row['conserve_weight_gbs']:.1f} | "
                  f"{row['speedup']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "threads": torch.get_num_threads(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
