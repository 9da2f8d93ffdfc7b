"""Throughput of conserve through its vLLM-shaped offline API on the shared workload.

    python benchmarks/peers/conserve_peer.py [--model PATH] [--dtypes bfloat16]

The last stdout line is the JSON result.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import workload as wl

# Run from a checkout without installing: fall back to the repository's src/ folder.
if importlib.util.find_spec("conserve") is None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))


def _metrics_decode(out, n: int) -> tuple[float, float] | None:
    """(ttft_s, decode tok/s) from per-request timestamps, if the output carries vLLM-style ones."""
    m = getattr(out, "metrics", None) or {}
    get = m.get if isinstance(m, dict) else lambda k: getattr(m, k, None)  # dict or vLLM-style object
    first, last, start = get("first_token_time"), get("last_token_time"), get("arrival_time")
    if not (first and last and start) or last <= first or n < 2:
        return None
    return first - start, (n - 1) / (last - first)


def measure(dtype: str, model: str | None) -> dict:
    from conserve import LLM, SamplingParams
    from conserve.request import RequestClass

    n_req, n_out = wl.num_requests(), wl.output_tokens()
    run = {"dtype": dtype}
    t0 = time.perf_counter()
    llm = LLM(model=model, dtype=dtype)
    run["startup_s"] = round(time.perf_counter() - t0, 2)
    wl.log(f"conserve {dtype}: ready in {run['startup_s']}s")

    convs = wl.conversations(n_req)
    params = SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True)
    warm = SamplingParams(temperature=0, max_tokens=wl.WARMUP_TOKENS, ignore_eos=True)
    # Batch work is offline work in conserve (what a batch job or flex request is); a lone chat is online.
    offline = RequestClass.OFFLINE
    run["batch"] = wl.timed_batch(lambda c, w: llm.chat(c, warm if w else params, use_tqdm=False,
                                                        request_class=offline), convs, f"conserve {dtype}")

    one = [wl.single_stream_conversation()]
    llm.chat(one, warm, use_tqdm=False)
    # The offline API returns whole outputs, so time the prefill alone (1 token) to split TTFT off.
    t0 = time.perf_counter()
    llm.chat(one, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    ttft = time.perf_counter() - t0
    wl.log(f"conserve {dtype}: single stream run")
    t0 = time.perf_counter()
    out = llm.chat(one, params, use_tqdm=False)[0]
    dt = time.perf_counter() - t0
    n = len(out.outputs[0].token_ids)
    from_metrics = _metrics_decode(out, n)
    stream = wl.stream_result(n, dt, None if from_metrics else ttft)
    if from_metrics:
        stream["ttft_s"], stream["decode_tok_s"] = round(from_metrics[0], 4), round(from_metrics[1], 2)
    stream["ttft_from"] = "request metrics" if from_metrics else "separate 1-token call"
    stream["prompt_tokens"] = len(out.prompt_token_ids)
    run["single"] = stream
    wl.log(f"conserve {dtype}: single {stream}")

    def generate(prompts, n, request_class=offline):
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        return llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False,
                            request_class=request_class)
    tok = llm.get_tokenizer()
    run["prefill"] = wl.timed_prefill(generate, lambda text: tok.encode(text, add_special_tokens=False),
                                      f"conserve {dtype}",
                                      first_token=lambda p: generate([p], 1, RequestClass.ONLINE))
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="GGUF file or HF directory (default model if unset)")
    ap.add_argument("--dtypes", default="bfloat16")
    args = ap.parse_args()
    import conserve

    result = wl.base_info("conserve")
    result["version"] = getattr(conserve, "__version__", None)
    for dtype in args.dtypes.split(","):
        result["runs"].append(measure(dtype, args.model))
    wl.emit(result)


if __name__ == "__main__":
    main()
