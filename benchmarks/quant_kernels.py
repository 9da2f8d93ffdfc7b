"""Weight-only quantised matmuls on this CPU: kernel times for the default model's shapes, and the
engine's single-stream decode speed with each --quantization mode.

Part 1 times one matmul per (weight, kernel, activation dtype, tokens M): dense (float32 F.linear,
bfloat16 oneDNN-prepacked as the engine runs it), int8 and int4 as the engine runs them (activations
rounded to bfloat16 around the kernel), and the kernels' own float32 paths ("int8-f32", "int4-f32",
float32 activations and scales) to show why the engine does not use those. Each layer weight is
timed as a pass over `layers` distinct random copies (so caches hold no more than the real model
lets them), divided by the count. Part 2 loads the engine per dtype and mode (LLM API, greedy,
64 tokens, one stream) and reports generated tokens per second after one warm-up request.

    python benchmarks/quant_kernels.py [--tokens 1 4 16 64] [--out quant_kernels.json] [--skip-engine]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from conserve.bench.timing import call_times

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
LAYERS = 30


def fastest(run, repeats: int) -> float:
    return min(call_times(run, repeats))


def kernels(weight: torch.Tensor, dtype: torch.dtype) -> dict:
    """name -> function of x for this weight: what the engine would run, and the native float32 paths."""
    from conserve.model.int4 import GROUP, Int4Weight, quantize_q4
    from conserve.model.int8 import Int8Weight
    from conserve.model.llama import linear, onednn_prepack_available

    dense = weight.to(dtype)
    if dtype == torch.bfloat16 and onednn_prepack_available():
        dense = torch.ops.mkldnn._reorder_linear_weight(dense.contiguous(), 32)
    i8, i4 = Int8Weight(weight), Int4Weight([quantize_q4(weight)])
    out = {"dense": lambda x: linear(x, dense, None), "int8": i8.matmul, "int4": i4.matmul}
    if dtype == torch.float32:
        s8, sz4 = i8.scale.float(), i4.scales_zeros.float()
        out["int8-f32"] = lambda x: torch.ops.aten._weight_int8pack_mm(x, i8.q, s8)
        out["int4-f32"] = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, i4.packed, GROUP, sz4)
    return out


def kernel_table(tokens: list[int], repeats: int) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        copies = 1 if name == "lm_head" else LAYERS
        weights = [torch.randn(n, k) * 0.05 for _ in range(copies)]
        for dtype in (torch.float32, torch.bfloat16):
            per_copy = [kernels(w, dtype) for w in weights]
            for m in tokens:
                x = torch.randn(m, k).to(dtype)
                row = {"weight": name, "shape": [n, k], "dtype": str(dtype).removeprefix("torch."), "M": m}
                for kernel in per_copy[0]:
                    if kernel.endswith("-f32") and m > 4:
                        continue  # 10-100x slower than the rest: a few sizes say enough
                    with torch.inference_mode():
                        t = fastest(lambda: [fns[kernel](x) for fns in per_copy], repeats)
                    row[kernel] = round(t / copies * 1e3, 4)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def engine_table(max_tokens: int) -> list[dict]:
    from conserve import LLM, SamplingParams

    rows = []
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for dtype in ("float32", "bfloat16"):
        for mode in ("none", "auto", "int8", "int4"):
            started = time.perf_counter()
            llm = LLM(dtype=dtype, quantization=mode, scheduler="fcfs", kv_cache_gb=0.25)
            load_s = time.perf_counter() - started
            tok = llm.get_tokenizer()
            prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Tell me about the sea."}],
                                                        add_generation_prompt=True), add_special_tokens=False)
            llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
            started = time.perf_counter()
            out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
            elapsed = time.perf_counter() - started
            model = llm.engine.runner.model
            row = {"dtype": dtype, "quantization": mode, "used": model.quant_tag() or "dense",
                   "tok_s": round(len(out.outputs[0].token_ids) / elapsed, 1), "load_s": round(load_s, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del llm
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--out", default="quant_kernels.json")
    args = p.parse_args()
    from conserve.machine import machine_info

    info = {**machine_info(), "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability()}
    kernels_rows = kernel_table(args.tokens, args.repeats)
    engine_rows = [] if args.skip_engine else engine_table(args.decode_tokens)
    names = ["dense", "int8", "int4", "int8-f32", "int4-f32"]
    print(f"\n{info['cpu']} ({info['capability']}), {info['threads']} threads, torch {info['torch']}; ms per matmul")
    print("| weight | act | M | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for r in kernels_rows:
        cells = " | ".join(f"{r[n]:.3f}" if n in r else "" for n in names)
        print(f"| {r['weight']} {r['shape'][0]}x{r['shape'][1]} | {r['dtype']} | {r['M']} | {cells} |")
    if engine_rows:
        print(f"\nsingle-stream greedy decode, {args.decode_tokens} tokens (LLM API)")
        print("| dtype | --quantization | used (kind, max tokens) | tok/s | load s |")
        print("|---|---|---|---|---|")
        for r in engine_rows:
            print(f"| {r['dtype']} | {r['quantization']} | {r['used']} | {r['tok_s']} | {r['load_s']} |")
    with open(args.out, "w") as f:
        json.dump({"machine": info, "kernels": kernels_rows, "engine": engine_rows}, f, indent=1)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
