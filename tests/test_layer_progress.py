"""Safepoints in device time (layer_progress.py), with a fake device that runs behind the host: it runs
a layer only when the host waits for it (or the test lets it), as a GPU runs what the host enqueued."""

import json

import pytest

from conftest import rough_latency_model
from conserve.config import EngineConfig
from conserve.engine import Engine
from conserve.layer_progress import HostEvent, LayerProgress
from conserve.preemption import LayerPreemption
from conserve.request import RequestClass
from conserve.sampling_params import SamplingParams
from conserve.sched.config import SchedulerConfig


class LaggingDevice:
    def __init__(self):
        self.recorded = 0  # layers the host issued
        self.ran = 0  # layers the device finished
        self.waits = 0

    def event(self):
        device = self

        class Event:
            def record(self):
                self.index = device.recorded
                device.recorded += 1

            def query(self):
                return self.index < device.ran

            def synchronize(self):
                device.waits += 1
                device.ran = max(device.ran, self.index + 1)

        return Event()


@pytest.mark.parametrize("lookahead", [1, 2, 3])
def test_the_host_stays_at_most_lookahead_layers_ahead_of_the_device(lookahead):
    device = LaggingDevice()
    progress = LayerProgress(device.event, lookahead)
    progress.begin()
    for issued in range(1, 13):
        progress.layer_issued()
        assert issued - device.ran <= lookahead
        assert device.ran == max(0, issued - lookahead)  # the host waited for no more than it had to
    assert progress.layers_done() == 12 - lookahead
    progress.finish()
    assert device.ran == 12 and progress.layers_done() == 12


def test_layers_done_reads_the_device_not_the_host():
    device = LaggingDevice()
    progress = LayerProgress(device.event, lookahead=4)
    progress.begin()
    for _ in range(6):
        progress.layer_issued()
    assert progress.layers_done() == 2
    device.ran = 5  # the device caught up on its own
    assert progress.layers_done() == 5


def test_host_events_and_lookahead_zero_never_wait():
    for progress in (LayerProgress(HostEvent, 1), LayerProgress(HostEvent, 0)):
        progress.begin()
        for _ in range(5):
            progress.layer_issued()
        assert progress.layers_done() == 5


def test_the_stop_decision_uses_the_device_pace(monkeypatch):
    # layer-restart: stop only if the rest of the run would make the arrival wait past its objectives.
    # 8 layers issued in 10 ms, but the device finished only 2: the rest is 30 layers at 5 ms, not 1.25.
    clock = [100.0]
    monkeypatch.setattr("conserve.preemption.time.monotonic", lambda: clock[0])
    config = SchedulerConfig(slo_tbt_s=0.1, slo_ttft_s=10.0)
    device = LaggingDevice()
    progress = LayerProgress(device.event, lookahead=6)
    preemption = LayerPreemption(config, rough_latency_model(), keeps_work=False)
    check = preemption.safepoint(0, 0, 32, progress)
    progress.begin()
    preemption.online_arrival(10)
    for layer in range(8):
        progress.layer_issued()
    clock[0] += 0.010
    assert device.ran == 2
    assert check(7)  # 30 layers x 5 ms > 100 ms TBT objective
    host_paced = preemption.safepoint(0, 0, 32)
    assert not host_paced(7)  # at the host's pace: 24 x 1.25 ms, within it


def test_an_engine_stop_waits_for_the_device_to_finish_the_issued_layers(tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256}))
    engine = Engine(EngineConfig(model=str(config_path), load_format="dummy", dtype="float32", kv_cache_gb=0.01,
                                 safepoint_lookahead=2, offline_kv="recompute"),
                    latency_model=rough_latency_model())
    device = LaggingDevice()
    engine.runner.progress = LayerProgress(device.event, 2)
    engine.add_request("off", list(range(3, 40)), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                       RequestClass.OFFLINE)
    seen = engine.preemption.arrivals
    engine.preemption.online_arrival(5)  # arrives while the offline iteration runs
    assert engine.step(seen) == []
    assert engine.preemption.num_preemptions == 1 and engine._suspended is not None
    assert device.recorded == 1 and device.ran == 1  # stopped at the first safepoint, after the device got there
    while engine.has_unfinished_requests():
        engine.step()
