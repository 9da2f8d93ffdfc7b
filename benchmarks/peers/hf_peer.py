"""Throughput of HF transformers `generate` on the default GGUF, float32 and bfloat16.

    python benchmarks/peers/hf_peer.py [--gguf PATH] [--dtypes float32,bfloat16]

Batched generate uses left padding (decoder-only models continue from the last position).
The last stdout line is the JSON result.
"""

from __future__ import annotations

import argparse
import os
import time

import workload as wl


class _FirstTokenTimer:
    """A generate() streamer that only records when the first new token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value) -> None:  # first call carries the prompt, the second the first new token
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = args.gguf or wl.default_gguf()
    folder, name = os.path.split(gguf)
    result = wl.base_info("hf-transformers")
    result["version"] = transformers.__version__
    result["torch_threads"] = torch.get_num_threads()

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    wl.log(f"hf: loaded {name} in {load_s:.1f}s")

    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    n_req, n_out = wl.num_requests(), wl.output_tokens()

    def encode(convs):
        texts = tok.apply_chat_template(convs, add_generation_prompt=True, tokenize=False)
        return tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)

    def generate(enc, n, **kw):
        # min_new_tokens == max_new_tokens is HF's ignore_eos: EOS is masked until n tokens exist.
        with torch.inference_mode():
            return model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=tok.pad_token_id, **kw)

    batch_enc = encode(wl.conversations(n_req))
    one_enc = encode([wl.single_stream_conversation()])
    for dtype in args.dtypes.split(","):
        t0 = time.perf_counter()
        model.to(getattr(torch, dtype))
        run = {"dtype": dtype, "startup_s": round(load_s + time.perf_counter() - t0, 2)}

        generate(batch_enc, wl.WARMUP_TOKENS)
        wl.log(f"hf {dtype}: batch run")
        t0 = time.perf_counter()
        out = generate(batch_enc, n_out)
        dt = time.perf_counter() - t0
        prompt = int(batch_enc["attention_mask"].sum())
        gen = (out.shape[1] - batch_enc["input_ids"].shape[1]) * out.shape[0]
        run["batch"] = wl.batch_result(out.shape[0], prompt, gen, dt)
        wl.log(f"hf {dtype}: batch {run['batch']}")

        generate(one_enc, wl.WARMUP_TOKENS)
        wl.log(f"hf {dtype}: single stream run")
        timer = _FirstTokenTimer()
        t0 = time.perf_counter()
        out = generate(one_enc, n_out, streamer=timer)
        dt = time.perf_counter() - t0
        n = out.shape[1] - one_enc["input_ids"].shape[1]
        first = None if timer.first is None else timer.first - t0
        run["single"] = wl.stream_result(n, dt, first)
        run["single"]["prompt_tokens"] = one_enc["input_ids"].shape[1]
        wl.log(f"hf {dtype}: single {run['single']}")
        result["runs"].append(run)
    wl.emit(result)


if __name__ == "__main__":
    main()
