"""Roofline floors for the default model on this machine.

Measures memory bandwidth (large tensor copy and read) and matmul rates with torch, then bounds
  single-stream decode: time/token >= weight bytes / bandwidth
  batch decode step:    time/step  >= max(bytes / bandwidth, FLOPs / matmul rate)
No real engine can beat these; the benchmark prints them next to the measured numbers.

    python benchmarks/roofline.py [--batch 32] [--prompt 44] [--out 128] [--json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch

from conserve.bench.timing import call_times


@dataclass(frozen=True)
class ModelShape:
    # SmolLM2-135M (Llama); the defaults are the GGUF's values.
    layers: int = 30
    hidden: int = 576
    intermediate: int = 1536
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64
    vocab: int = 49152

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each weight matmul in one layer, plus the tied lm_head."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"qkv": (h, q + 2 * kv), "o": (q, h), "gate_up": (h, 2 * self.intermediate),
                "down": (self.intermediate, h), "lm_head": (h, self.vocab)}

    def matmul_params(self) -> int:
        lin = self.linears()
        per_layer = sum(i * o for k, (i, o) in lin.items() if k != "lm_head")
        return self.layers * per_layer + self.hidden * self.vocab

    def params(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        return self.matmul_params() + norms  # the embedding is the (tied) lm_head

    def kv_bytes_per_token(self, elem: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * elem


def _best(fn, reps: int) -> float:
    return min(call_times(fn, reps))


def bandwidth_gbs(mib: int = 512, reps: int = 7) -> dict[str, float]:
    """Copy counts read+write bytes; read is a sum (what streaming weights needs)."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    copy = 2 * nbytes / _best(lambda: dst.copy_(src), reps) / 1e9
    read = nbytes / _best(lambda: src.sum(), reps) / 1e9
    return {"copy": round(copy, 1), "read": round(read, 1)}


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, reps: int = 5) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    inner = max(1, int(2e8 // (2 * m * k * n)))  # small shapes: loop so the timer resolves them

    def run():
        for _ in range(inner):
            torch.mm(a, b)
    return 2 * m * k * n * inner / _best(run, reps) / 1e9


def measure(batch: int, shape: ModelShape) -> dict:
    rates: dict[str, dict[str, float]] = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        r = {"peak_2048": matmul_gflops(2048, 2048, 2048, dtype, reps=3)}
        for m in sorted({1, batch}):
            for lin, (i, o) in shape.linears().items():
                r[f"{lin}_m{m}"] = matmul_gflops(m, i, o, dtype)
        rates[name] = {k: round(v, 1) for k, v in r.items()}
    return {"bandwidth_gbs": bandwidth_gbs(), "matmul_gflops": rates,
            "threads": torch.get_num_threads()}


def _matmul_seconds(rates: dict[str, float], shape: ModelShape, m: int) -> float:
    """Time of one step's weight matmuls at the rates measured for exactly these shapes."""
    t = 0.0
    for lin, (i, o) in shape.linears().items():
        count = 1 if lin == "lm_head" else shape.layers
        t += count * 2 * m * i * o / (rates[f"{lin}_m{m}"] * 1e9)
    return t


def floors(meas: dict, shape: ModelShape, batch: int, prompt: float, out: int,
           single_prompt: float, long_prompts: tuple[int, int, int] = (16, 1024, 128)) -> dict:
    """Per dtype: floors for one single-stream decode step and one batch run (prefill + decode).

    Single stream: bytes / bandwidth (the brief's definition; GEMV rates are a library limit).
    Batch step: max(bytes / bandwidth, matmul FLOPs at the measured rate for each real shape
    + attention FLOPs at peak rate). `*_peak` uses the 2048^3 peak for every matmul instead.
    """
    bw = max(meas["bandwidth_gbs"].values()) * 1e9  # optimistic: a floor, not an estimate
    res = {}
    for dtype, elem in (("bfloat16", 2), ("float32", 4)):
        rates = meas["matmul_gflops"][dtype]
        peak = rates["peak_2048"] * 1e9
        wbytes = shape.params() * elem
        kv_tok = shape.kv_bytes_per_token(elem)
        attn_tok = 4 * shape.heads * shape.head_dim * shape.layers  # QK^T and PV FLOPs per ctx token
        t1 = (wbytes + (single_prompt + out / 2) * kv_tok) / bw

        ctx = prompt + out / 2  # mean context each decode step reads
        step_mem = (wbytes + batch * ctx * kv_tok) / bw
        step_attn = batch * ctx * attn_tok / peak
        step_cpu = _matmul_seconds(rates, shape, batch) + step_attn
        step_peak = 2 * batch * shape.matmul_params() / peak + step_attn
        prefill = batch * prompt * 2 * shape.matmul_params() / peak  # prompt matmuls are large: peak

        def run_s(step: float) -> float:
            return max(prefill, wbytes / bw) + out * step

        tb, tp = max(step_mem, step_cpu), max(step_mem, step_peak)
        res[dtype] = {
            "weight_mb": round(wbytes / 1e6, 1),
            "single_ms_per_tok": round(t1 * 1e3, 2), "single_tok_s": round(1 / t1, 1),
            "batch_step_ms": round(tb * 1e3, 2),
            "batch_bound": "memory" if step_mem >= step_cpu else "compute",
            "batch_gen_tok_s": round(batch * out / run_s(tb), 1),
            "batch_total_tok_s": round(batch * (prompt + out) / run_s(tb), 1),
            "batch_step_ms_peak": round(tp * 1e3, 2),
            "batch_gen_tok_s_peak": round(batch * out / run_s(tp), 1),
            **_prefill_floor(shape, long_prompts, wbytes, kv_tok, attn_tok, bw, peak),
        }
    q4 = shape.params() * 0.625 + (single_prompt + out / 2) * shape.kv_bytes_per_token(2)
    res["q4_1"] = {"weight_mb": round(shape.params() * 0.625 / 1e6, 1),
                   "single_ms_per_tok": round(q4 / bw * 1e3, 2), "single_tok_s": round(bw / q4, 1)}
    return res


def _prefill_floor(shape: ModelShape, prefill: tuple[int, int, int], wbytes: float, kv_tok: float,
                   attn_tok: float, bw: float, peak: float) -> dict:
    n, length, out = prefill
    flops_tok = 2 * shape.matmul_params()
    one_prompt = (length * flops_tok + length * length / 2 * attn_tok) / peak  # causal: half the square
    ttft = max(one_prompt, wbytes / bw)
    ctx = length + out / 2
    step = max((wbytes + n * ctx * kv_tok) / bw, (n * flops_tok + n * ctx * attn_tok) / peak)
    run = max(n * one_prompt, wbytes / bw) + out * step
    return {"prefill_ttft_ms": round(ttft * 1e3, 1), "prefill_run_s": round(run, 2),
            "prefill_total_tok_s": round(n * (length + out) / run, 1)}


def roofline(batch: int = 32, prompt: float = 44, out: int = 128, single_prompt: float = 59,
             shape: ModelShape = ModelShape(), prefill: tuple[int, int, int] = (16, 1024, 128)) -> dict:
    meas = measure(batch, shape)
    return {"model": asdict(shape) | {"params": shape.params()}, "measured": meas,
            "workload": {"batch": batch, "prompt": prompt, "out": out, "single_prompt": single_prompt,
                         "prefill": list(prefill)},
            "floors": floors(meas, shape, batch, prompt, out, single_prompt, prefill)}


def table(r: dict) -> str:
    m = r["measured"]
    lines = [f"bandwidth: copy {m['bandwidth_gbs']['copy']} GB/s, read {m['bandwidth_gbs']['read']} GB/s; "
             f"matmul peak bf16 {m['matmul_gflops']['bfloat16']['peak_2048']} / "
             f"fp32 {m['matmul_gflops']['float32']['peak_2048']} GFLOP/s "
             f"({m['threads']} threads); params {r['model']['params'] / 1e6:.1f}M",
             "| dtype | weights MB | single ms/tok floor | single tok/s ceiling | batch step ms floor "
             "| bound | batch gen tok/s ceiling | batch total tok/s ceiling | gen tok/s ceiling at peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dt, f in r["floors"].items():
        if "batch_step_ms" not in f:  # q4_1: single stream only
            lines.append(f"| {dt} | {f['weight_mb']} | {f['single_ms_per_tok']} | {f['single_tok_s']} "
                         "| - | - | - | - | - |")
            continue
        lines.append(f"| {dt} | {f['weight_mb']} | {f['single_ms_per_tok']} | {f['single_tok_s']} | "
                     f"{f['batch_step_ms']} | {f['batch_bound']} | {f['batch_gen_tok_s']} | "
                     f"{f['batch_total_tok_s']} | {f['batch_gen_tok_s_peak']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description="roofline floors for the default model")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=float, default=44, help="mean prompt tokens in the batch")
    ap.add_argument("--single-prompt", type=float, default=59)
    ap.add_argument("--out", type=int, default=128)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = ap.parse_args()
    r = roofline(a.batch, a.prompt, a.out, a.single_prompt)
    print(json.dumps(r) if a.json else table(r))


if __name__ == "__main__":
    main()
