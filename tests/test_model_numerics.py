"""conserve against HF transformers on the same dequantised weights (float32)."""

from __future__ import annotations

import pytest
import torch

from conserve import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.reference]

# Token ids, so the check does not depend on the tokenizer: short, long enough to be chunked
# (the fixture's budget is 48 tokens), and of mixed lengths to batch together.
PROMPTS = [
    [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2],
    [1, 4093, 198] + [(37 * i) % 40000 + 100 for i in range(120)] + [2, 198, 1, 520, 9531, 198],
    [1, 520, 9531, 198, 19556, 282, 4303, 314, 28, 2, 198],
    [504, 3458, 5457, 260, 1345, 3145, 429, 260, 20478, 2767, 30],
]


def capture_logits(llm, prompts, params):
    """Run prompts through the engine, recording the float32 logits the model computed."""
    model = llm.engine.runner.model
    seen: list[torch.Tensor] = []
    original = model.compute_logits

    def recording(hidden):
        logits = original(hidden)
        seen.append(logits.clone())
        return logits

    model.compute_logits = recording
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        model.compute_logits = original
    return outs, seen


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with transformers' KV cache and nothing else (generate() would mask EOS
    under min_new_tokens, while ignore_eos lets EOS be chosen and keeps going)."""
    out: list[int] = []
    ids, past = torch.tensor([prompt]), None
    with torch.inference_mode():
        for _ in range(n):
            res = model(ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(int(res.logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_prompt_logits_match_transformers(llm_fp32, hf_model, index):
    prompt = PROMPTS[index]
    _, seen = capture_logits(llm_fp32, [prompt], SamplingParams(temperature=0, max_tokens=1))
    with torch.inference_mode():
        ref = hf_model(torch.tensor([prompt])).logits[0, -1]
    ours = seen[0][0]
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, f"relative logits error {rel:.2e}"


def test_batched_greedy_generation_matches_transformers(llm_fp32, hf_model):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = llm_fp32.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(hf_model, prompt, 32)
        assert out.outputs[0].finish_reason == "length"


def test_batched_generation_equals_one_at_a_time(llm_fp32):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in
                llm_fp32.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)]
    alone = [llm_fp32.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0].outputs[0].token_ids
             for p in PROMPTS]
    assert together == alone


def test_decode_step_logits_match_transformers(llm_fp32, hf_model):
    prompt = PROMPTS[2]
    outs, seen = capture_logits(llm_fp32, [prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    tokens = prompt + outs[0].outputs[0].token_ids
    with torch.inference_mode():
        ref = hf_model(torch.tensor([tokens])).logits[0]
    for step, logits in enumerate(seen):
        expect = ref[len(prompt) - 1 + step]
        rel = (logits[0] - expect).abs().max() / expect.abs().max()
        assert rel < 1e-4, f"step {step}: relative logits error {rel:.2e}"
