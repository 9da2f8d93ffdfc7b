"""Throughput of llama.cpp (llama-cpp-python) on the default GGUF, the single-stream peer.

Run with the llama.cpp virtualenv's python (scripts/setup_llamacpp_venv.sh):

    OMP_NUM_THREADS=2 .venv-llamacpp/bin/python benchmarks/peers/llamacpp_peer.py [--gguf PATH]

llama-cpp-python runs one sequence at a time, so its "batch" is the same requests one after another.
EOS is masked by a logit bias so every request generates exactly the tokens asked for.
The last stdout line is the JSON result.
"""

from __future__ import annotations

import argparse
import os
import time
from types import SimpleNamespace

import workload as wl


def _output(prompt_ids: list[int], n_generated: int):
    """A vLLM-shaped output (only the token counts matter to the workload's timers)."""
    return SimpleNamespace(prompt_token_ids=prompt_ids,
                           outputs=[SimpleNamespace(token_ids=[0] * n_generated)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=None)
    args = ap.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)

    import llama_cpp
    from llama_cpp import Llama

    gguf = args.gguf or wl.default_gguf()
    n_req, n_out = wl.num_requests(), wl.output_tokens()
    _, plen, pout = wl.prefill_sizes()
    result = wl.base_info("llama.cpp")
    result["version"] = llama_cpp.__version__
    run = {"dtype": os.path.basename(gguf).rsplit(".", 2)[-2]}  # the GGUF's quantisation, e.g. Q4_1

    t0 = time.perf_counter()
    llm = Llama(model_path=gguf, n_ctx=max(2048, plen + pout + 64), n_threads=threads,
                n_threads_batch=threads, n_batch=512, seed=0, verbose=False)
    run["startup_s"] = round(time.perf_counter() - t0, 2)
    wl.log(f"llama.cpp: loaded {gguf} in {run['startup_s']}s ({threads} threads)")
    no_eos = {llm.token_eos(): -1e9}

    convs, one = wl.conversations(n_req), wl.single_stream_conversation()
    # The chat handler formats and tokenizes each conversation itself; count the same prompt ids
    # here, before any timing starts.
    prompt_ids = {id(c): _chat_prompt_ids(llm, c) for c in convs + [one]}

    def chat_one(conv, n, on_first=None):
        """Stream one chat; returns (prompt ids, generated tokens). Each chunk is one token."""
        count = 0
        llm.reset()  # no reuse of an earlier identical prompt's cache (the warm-up's): prefill it all
        for chunk in llm.create_chat_completion(conv, max_tokens=n, temperature=0.0, logit_bias=no_eos,
                                                stream=True):
            if chunk["choices"][0]["delta"].get("content") is not None:
                count += 1
                if count == 1 and on_first:
                    on_first()
        return prompt_ids[id(conv)], count

    def chat(convs, warm):
        n = wl.WARMUP_TOKENS if warm else n_out
        return [_output(*chat_one(c, n)) for c in convs]

    run["batch"] = wl.timed_batch(chat, convs, "llama.cpp")

    chat_one(one, wl.WARMUP_TOKENS)
    wl.log("llama.cpp: single stream run")
    first: list[float] = []
    t0 = time.perf_counter()
    ids, n = chat_one(one, n_out, on_first=lambda: first.append(time.perf_counter()))
    dt = time.perf_counter() - t0
    stream = wl.stream_result(n, dt, first[0] - t0 if first else None)
    stream["prompt_tokens"] = len(ids)
    run["single"] = stream
    wl.log(f"llama.cpp: single {stream}")

    def generate(prompts, n):
        outs = []
        for ids in prompts:
            llm.reset()  # no reuse of the previous prompt's cache: every prompt is prefilled whole
            done = llm.create_completion(ids, max_tokens=n, temperature=0.0, logit_bias=no_eos)
            outs.append(_output(ids, done["usage"]["completion_tokens"]))
        return outs
    run["prefill"] = wl.timed_prefill(generate, lambda text: llm.tokenize(text.encode(), add_bos=False,
                                                                           special=False), "llama.cpp")
    result["runs"].append(run)
    wl.emit(result)


def _chat_prompt_ids(llm, conv) -> list[int]:
    """The prompt tokens llama.cpp's chat handler would feed for `conv` (for the table's counts)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    meta = llm.metadata
    template = meta.get("tokenizer.chat_template")
    if not template:
        return []
    fmt = Jinja2ChatFormatter(template=template, eos_token=llm.detokenize([llm.token_eos()]).decode(),
                              bos_token=llm.detokenize([llm.token_bos()]).decode())
    text = fmt(messages=conv).prompt
    return llm.tokenize(text.encode(), add_bos=False, special=True)


if __name__ == "__main__":
    main()
