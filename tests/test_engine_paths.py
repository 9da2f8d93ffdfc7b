"""The faster paths change no float32 result: the compiled layer body (`--compile on`), the padded
gather (`--attention gather`), FlexAttention's paged decode (`--attention flex`, CUDA's path, eager
here), the prefill kernel's float32 path (`--prefill-attention kernel`) and eager element-wise ops
(`--fused-ops off`) give the greedy tokens of the default engine (fused rotary and norms, paged
kernel, torch's prefill attention for float32), which test_model_numerics holds to HF transformers. Prompts of mixed lengths are batched and
chunked, so decodes of short and long contexts share iterations."""

from __future__ import annotations

import pytest

from conserve import LLM, SamplingParams
from test_model_numerics import PROMPTS, capture_logits

pytestmark = pytest.mark.slow

PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def variant(**kwargs) -> LLM:
    return LLM(dtype="float32", max_num_batched_tokens=48, kv_cache_gb=0.25, scheduler="fcfs", **kwargs)


@pytest.fixture(scope="module")
def reference(llm_fp32):
    assert not llm_fp32.engine.runner.prefill_kernel  # auto keeps float32 prompts on torch's attention
    assert type(llm_fp32.engine.runner.model.body).__name__ == "FusedLayerBody"
    return capture_logits(llm_fp32, PROMPTS, PARAMS)


@pytest.mark.parametrize("kwargs", [{"compile": "on"}, {"attention": "gather"}, {"attention": "flex"},
                                    {"prefill_attention": "kernel"}, {"fused_ops": "off"}],
                         ids=["compiled", "gather", "flex", "prefill-kernel", "eager-ops"])
def test_path_matches_default(reference, kwargs):
    ref_outs, ref_logits = reference
    llm = variant(**kwargs)
    if "compile" in kwargs:
        assert type(llm.engine.runner.model.body).__name__ == "CompiledLayerBody"
    elif "fused_ops" in kwargs:
        assert type(llm.engine.runner.model.body).__name__ == "LayerBody"
    elif "prefill_attention" in kwargs:
        assert llm.engine.runner.prefill_kernel
    else:
        assert not llm.engine.runner.paged_kernel
        assert (llm.engine.runner.flex is not None) == (kwargs["attention"] == "flex")
    outs, logits = capture_logits(llm, PROMPTS, PARAMS)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref_outs]
    assert len(logits) == len(ref_logits)
    for ours, ref in zip(logits, ref_logits):
        assert (ours - ref).abs().max() / ref.abs().max() < 1e-5

