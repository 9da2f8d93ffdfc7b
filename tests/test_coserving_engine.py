"""Co-serving on the real default model: online and offline requests scheduled together (chunked,
mixed in iterations, offline preempted for memory) produce exactly the greedy float32 outputs each
request gets alone."""

import pytest

from conftest import default_gguf, rough_latency_model
from conserve.config import EngineConfig
from conserve.engine import Engine
from conserve.request import RequestClass
from conserve.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def prompt(i, length):
    return [1] + [(977 * i + 31 * j) % 40000 + 200 for j in range(length - 1)]


def run_alone(engine, ids):
    engine.add_request("alone", ids, GREEDY)
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
    return out.outputs[0].token_ids


def test_online_and_offline_outputs_equal_running_alone():
    default_gguf()
    # 24 blocks of 16 tokens hold 384 tokens: the offline requests (3 x ~140 tokens) and the online
    # ones cannot all stay resident, so offline requests are preempted and recomputed.
    config = EngineConfig(dtype="float32", num_kv_blocks=24, slo_tbt_ms=60, max_iteration_ms=150)
    engine = Engine(config, latency_model=rough_latency_model())
    offline = {f"off{i}": prompt(i, 120) for i in range(3)}
    online = {f"on{i}": prompt(10 + i, 40 + 30 * i) for i in range(3)}
    arrivals = {3: ["on0"], 6: ["on1"], 9: ["on2"]}
    for rid, ids in offline.items():
        engine.add_request(rid, ids, GREEDY, RequestClass.OFFLINE)
    requests = {rid: engine.scheduler.requests[rid] for rid in offline}
    outputs, mixed_iterations, step = {}, 0, 0
    while engine.has_unfinished_requests() or step <= max(arrivals):
        for rid in arrivals.get(step, []):
            engine.add_request(rid, online[rid], GREEDY, RequestClass.ONLINE)
            requests[rid] = engine.scheduler.requests[rid]
        sched_out = engine.scheduler.schedule
        classes = set()

        def spy(sched_out=sched_out, classes=classes):
            out = sched_out()
            classes.update(s.request.request_class for s in out.scheduled)
            return out

        engine.scheduler.schedule = spy
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = o.outputs[0].token_ids
        del engine.scheduler.schedule
        mixed_iterations += len(classes) == 2
        step += 1
        assert step < 500
    assert mixed_iterations > 0  # online and offline did share iterations
    # Each of them reported its measured time for the error tail the offline fill is planned against.
    assert len(engine.scheduler.fill_tail) == mixed_iterations
    assert any(requests[rid].num_preemptions for rid in offline)  # memory pressure did preempt offline
    assert not any(requests[rid].num_preemptions for rid in online)
    engine.offload.wait_all()  # the last checkpoint copies hold their blocks until they land
    assert engine.kv_manager.num_free_blocks == 24
    for rid, ids in {**offline, **online}.items():
        assert outputs[rid] == run_alone(engine, ids), rid
