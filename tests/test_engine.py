"""End-to-end behaviour of the engine on the real default model (float32 fixture)."""

from __future__ import annotations

import pytest

from conserve import RequestError, SamplingParams

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]


def test_chat_applies_template_and_returns_text(llm_fp32):
    out = llm_fp32.chat(CHAT, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    tok = llm_fp32.get_tokenizer()
    expected_prompt = tok.encode(tok.apply_chat_template(CHAT), add_special_tokens=False)
    assert out.prompt_token_ids == expected_prompt
    completion = out.outputs[0]
    assert completion.text and completion.text == tok.decode(completion.token_ids)
    assert completion.finish_reason in ("stop", "length")


def test_string_prompt_is_tokenised_without_added_special_tokens(llm_fp32):
    out = llm_fp32.generate("The sea is", SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert out.prompt == "The sea is"
    assert out.prompt_token_ids == llm_fp32.get_tokenizer().encode("The sea is", add_special_tokens=False)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llm_fp32):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm_fp32.chat(CHAT, params, use_tqdm=False)[0].outputs[0].token_ids
    other = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batch = llm_fp32.chat([CHAT, [{"role": "user", "content": "Hi"}]], [params, other], use_tqdm=False)
    assert batch[0].outputs[0].token_ids == alone
    reseeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=99, max_tokens=16, ignore_eos=True)
    assert llm_fp32.chat(CHAT, reseeded, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_top_k_one_is_greedy(llm_fp32):
    greedy = llm_fp32.chat(CHAT, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    k1 = llm_fp32.chat(CHAT, SamplingParams(temperature=0.8, top_k=1, max_tokens=12), use_tqdm=False)[0]
    assert k1.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_stop_string_cuts_text_and_reports_reason(llm_fp32):
    base = llm_fp32.chat(CHAT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    text = base.outputs[0].text
    stop = text[5:9]  # a piece of what the model will say, likely spanning tokens
    cut = llm_fp32.chat(CHAT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
                        use_tqdm=False)[0].outputs[0]
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm_fp32.chat(CHAT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                                              include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_stop_token_ids_and_max_tokens(llm_fp32):
    base = llm_fp32.chat(CHAT, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    ids = base.outputs[0].token_ids
    assert len(ids) == 10 and base.outputs[0].finish_reason == "length"
    stopped = llm_fp32.chat(CHAT, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[ids[3]]),
                            use_tqdm=False)[0].outputs[0]
    first = ids.index(ids[3])
    assert stopped.token_ids == ids[: first + 1] and stopped.stop_reason == ids[3]


def test_eos_ends_generation_unless_ignored(llm_fp32):
    out = llm_fp32.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(temperature=0, max_tokens=64),
                        use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == 2  # <|im_end|>
    assert "<|im_end|>" not in out.text
    n = len(out.token_ids)
    ignored = llm_fp32.chat([{"role": "user", "content": "What is the capital of France?"}],
                            SamplingParams(temperature=0, max_tokens=n + 4, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0]
    assert ignored.finish_reason == "length" and ignored.token_ids[:n] == out.token_ids
    assert len(ignored.token_ids) == n + 4


def test_logprobs_are_consistent(llm_fp32):
    out = llm_fp32.chat(CHAT, SamplingParams(temperature=0, max_tokens=6, logprobs=3), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for token, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token and len(lp.top) == 3
        assert lp.top[0][0] == token  # greedy: the chosen token is the most likely
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1] and lp.logprob <= 0
    assert out.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in out.logprobs))


def test_n_returns_independent_samples(llm_fp32):
    out = llm_fp32.chat(CHAT, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_multibyte_output_never_contains_broken_characters(llm_fp32):
    prompt = [{"role": "user", "content": "日本語で自己紹介してください。絵文字も使って 🎉🌸"}]
    out = llm_fp32.chat(prompt, SamplingParams(temperature=0.9, seed=3, max_tokens=40, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert "\ufffd" not in out.text or out.text.endswith("\ufffd")  # only a truncated final char may be
    assert out.text.rstrip("\ufffd") == llm_fp32.get_tokenizer().decode(out.token_ids).rstrip("\ufffd")


def test_bad_requests_raise_clear_errors_and_leave_engine_clean(llm_fp32):
    engine = llm_fp32.engine
    too_long = list(range(100, 100 + engine.max_model_len))
    with pytest.raises(RequestError, match="max_model_len"):
        llm_fp32.generate([{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": too_long}], use_tqdm=False)
    with pytest.raises(RequestError, match="vocabulary"):
        llm_fp32.generate({"prompt_token_ids": [1, 10**7]}, use_tqdm=False)
    with pytest.raises(RequestError, match="empty"):
        llm_fp32.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(RequestError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=0)
    assert not engine.has_unfinished_requests()
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.pool.num_blocks


def test_abort_frees_everything(llm_fp32):
    engine = llm_fp32.engine
    engine.add_request("abort-me", [1, 2, 3, 4], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.kv_manager.num_free_blocks < engine.kv_manager.pool.num_blocks
    engine.abort_request("abort-me")
    assert not engine.has_unfinished_requests()
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.pool.num_blocks


def test_small_kv_cache_forces_preemption_and_outputs_stay_exact():
    from conserve import LLM

    big = LLM(dtype="float32", kv_cache_gb=0.25, scheduler="fcfs")
    # 12 blocks of 16 tokens: eight 20-token prompts growing by 24 cannot all stay resident.
    small = LLM(dtype="float32", num_kv_blocks=12, max_num_batched_tokens=64, scheduler="fcfs")
    prompts = [{"prompt_token_ids": [1, 4093, 198] + [300 + 13 * i + j for j in range(17)]} for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expect = [o.outputs[0].token_ids for o in big.generate(prompts, params, use_tqdm=False)]
    got = small.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == expect
    assert small.engine.kv_manager.num_free_blocks == 12


def test_iteration_trace_logs_every_model_run(llm_fp32, tmp_path):
    import json

    from conserve.iteration_trace import IterationTrace

    engine = llm_fp32.engine
    path = tmp_path / "trace.jsonl"
    engine.trace = IterationTrace(str(path))
    try:
        out = llm_fp32.generate(["The sea is", "Once upon a time"], SamplingParams(temperature=0, max_tokens=5,
                                                                                 ignore_eos=True), use_tqdm=False)
    finally:
        engine.trace.close()
        engine.trace = None
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines and all(line["kind"] == "iteration" and line["s"] > 0 for line in lines)
    # Every prompt position and every sampled token but the last was computed in some logged run.
    positions = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in out)
    assert sum(line["on_dec"] + line["on_pre"] + line["off_dec"] + line["off_pre"] for line in lines) == positions
    assert [line["t"] for line in lines] == sorted(line["t"] for line in lines)
