"""KV cache sizing and the max_model_len it allows: pure functions, plus one engine on a tiny cache."""

import logging

import pytest

from conserve.kv.sizing import (
    KVCapacityError,
    activation_bytes,
    auto_kv_bytes,
    available_host_bytes,
    fit_max_model_len,
    gpu_kv_bytes,
)


def test_auto_size_takes_a_share_of_free_memory_capped_by_what_sequences_can_use():
    assert auto_kv_bytes(free_bytes=8 << 30, fraction=0.25, bytes_per_token=1000, max_model_len=8192,
                         max_num_seqs=1024) == 2 << 30
    assert auto_kv_bytes(free_bytes=8 << 30, fraction=0.25, bytes_per_token=1000, max_model_len=100,
                         max_num_seqs=4) == 400_000


def test_gpu_memory_utilization_leaves_the_kv_cache_its_share_less_weights_and_activations():
    gib = 1 << 30
    # An 80 GiB GPU at 0.9: 72 GiB for the engine; 16 GiB of weights in use, 2 GiB of activations.
    assert gpu_kv_bytes(80 * gib, 0.9, 16 * gib, 2 * gib) == 54 * gib
    with pytest.raises(KVCapacityError, match="gpu-memory-utilization 0.2"):
        gpu_kv_bytes(80 * gib, 0.2, 16 * gib, 2 * gib)
    # Llama-3.1-8B shapes, 8192 tokens, 256 sampled rows, bfloat16: a few GiB, growing with both.
    act = activation_bytes(4096, 14336, 6144, 128256, 8192, 256, 2)
    assert 1 * gib < act < 4 * gib
    assert activation_bytes(4096, 14336, 6144, 128256, 16384, 256, 2) > act


def test_available_host_memory_is_known_on_linux():
    free = available_host_bytes()
    assert free is not None and free > 0


def test_requested_length_beyond_the_cache_is_refused_naming_both_numbers_and_the_flags():
    with pytest.raises(KVCapacityError) as e:
        fit_max_model_len(requested=4096, model_len=8192, num_blocks=100, block_size=16)
    message = str(e.value)
    assert "4096" in message and "1600" in message and "--kv-cache-gb" in message and "--max-model-len" in message


def test_the_models_own_length_is_clamped_to_the_cache_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert fit_max_model_len(requested=None, model_len=8192, num_blocks=100, block_size=16) == 1600
    assert "1600" in caplog.text
    assert fit_max_model_len(requested=1000, model_len=8192, num_blocks=100, block_size=16) == 1000
    assert fit_max_model_len(requested=None, model_len=512, num_blocks=100, block_size=16) == 512


@pytest.mark.slow
def test_a_sequence_never_outgrows_a_tiny_cache_and_requests_behind_it_complete():
    from conserve import LLM, SamplingParams

    llm = LLM(dtype="float32", num_kv_blocks=4, block_size=16, scheduler="priority")  # 64 tokens in all
    assert llm.engine.max_model_len == 64
    prompts = [{"prompt_token_ids": [1, 4093, 198] + [300 + j for j in range(17)]} for _ in range(3)]
    # No max_tokens: each grows until max_model_len; before the clamp the first one outgrew the cache,
    # preempted itself and was never readmitted, and the others waited behind it forever.
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [44, 44, 44]
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert llm.engine.kv_manager.num_free_blocks == 4


@pytest.mark.slow
def test_an_explicit_max_model_len_beyond_the_cache_is_refused_at_start():
    from conserve import LLM

    with pytest.raises(KVCapacityError, match="max_model_len 128"):
        LLM(dtype="float32", num_kv_blocks=4, block_size=16, max_model_len=128)
