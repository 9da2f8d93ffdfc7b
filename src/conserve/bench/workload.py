"""The online requests of one run (when to send, what prompt, how many tokens) and the request bodies."""

from __future__ import annotations

import random
from dataclasses import dataclass

from conserve.bench.arrivals import arrival_offsets
from conserve.bench.config import DEFAULT_NUM_PROMPTS, BenchConfig
from conserve.bench.prompts import PromptBuilder, sample_lengths
from conserve.bench.trace import load_trace


@dataclass(frozen=True)
class OnlineRequest:
    arrival_s: float  # planned send time after the start
    prompt: str
    input_len: int  # requested prompt tokens (exact with a tokenizer, ~1 per word without)
    output_len: int  # generated tokens forced with max_tokens + ignore_eos


def build_workload(config: BenchConfig, builder: PromptBuilder) -> list[OnlineRequest]:
    """Deterministic for a given config (seeded): same arrivals, lengths and prompt texts."""
    rng = random.Random(config.seed)
    if config.trace is not None:
        rows = load_trace(config.trace, config.trace_rate_scale, config.num_prompts, config.max_input_len,
                          config.max_output_len)
        arrivals = [r.arrival_s for r in rows]
        inputs, outputs = [r.input_len for r in rows], [r.output_len for r in rows]
    else:
        n = config.num_prompts or DEFAULT_NUM_PROMPTS
        arrivals = arrival_offsets(n, config.rate, config.burstiness, config.seed)
        inputs = sample_lengths(n, config.input_len, config.input_len_range_ratio, rng)
        inputs = [min(i, config.max_input_len or i) for i in inputs]
        outputs = [min(config.output_len, config.max_output_len or config.output_len)] * n
    return [OnlineRequest(a, builder.build(i, rng), i, o) for a, i, o in zip(arrivals, inputs, outputs)]


def request_body(model: str, endpoint: str, prompt: str, max_tokens: int, stream: bool = True,
                 flex: bool = False) -> dict:
    """An OpenAI request that generates exactly max_tokens tokens: `ignore_eos` is the vLLM extension
    (conserve and vLLM accept it) that keeps generating past the end-of-sequence token."""
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if flex:
        body["service_tier"] = "flex"
    return body
