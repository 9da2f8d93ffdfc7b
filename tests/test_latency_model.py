"""The latency model fits, predicts, refines and persists; pure Python at prediction time."""

import random

import pytest

from conserve.sched.latency_model import LatencyModel, Sample, median


def true_time(p, c):
    return 0.004 + 2e-4 * p + 1e-6 * c + 1e-8 * p * p + 2e-9 * p * c


def grid(noise=0.0, seed=0):
    rng = random.Random(seed)
    return [Sample(p, c, true_time(p, c) * (1 + rng.uniform(-noise, noise)))
            for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
            for c in (0, 256, 1024, 4096, 16384)]


def test_fit_recovers_a_known_surface_and_generalises():
    model = LatencyModel.fit(grid(noise=0.03))
    held_out = [Sample(p, c, true_time(p, c)) for p, c in ((3, 100), (48, 3000), (700, 9000), (1500, 500))]
    errors = model.relative_errors(held_out)
    assert median(errors) < 0.05 and max(errors) < 0.15
    assert model.predict(1, 0) == pytest.approx(true_time(1, 0), rel=0.1)


def test_predictions_grow_with_work_and_never_go_negative():
    model = LatencyModel.fit(grid())
    assert model.predict(512, 1000) > model.predict(64, 1000) > model.predict(1, 1000)
    assert model.predict(32, 16000) > model.predict(32, 100)
    assert LatencyModel([-1.0, 0, 0, 0, 0]).predict(1, 1) == 0.0


def test_too_few_samples_is_an_error():
    with pytest.raises(ValueError, match="at least"):
        LatencyModel.fit(grid()[:3])


def test_observe_refits_toward_the_machine_it_runs_on():
    model = LatencyModel.fit(grid())
    slower = [Sample(s.p, s.c, 2 * s.seconds) for s in grid(seed=1)]
    refits = 0
    for _ in range(20):
        for s in slower:
            refits += model.observe(s.p, s.c, s.seconds, refit_every=60)
    assert refits > 0
    assert model.predict(64, 1000) == pytest.approx(2 * true_time(64, 1000), rel=0.05)
    assert len(model.recent) <= model.recent.maxlen


def test_json_round_trip_and_rejects_malformed(tmp_path):
    model = LatencyModel.fit(grid())
    path = tmp_path / "lat" / "model.json"
    model.save(path)
    assert LatencyModel.load(path).coefficients == model.coefficients
    with pytest.raises(ValueError):
        LatencyModel.from_json({"features": ["1"], "coefficients": [1.0]})
    with pytest.raises(ValueError):
        LatencyModel.from_json({**model.to_json(), "coefficients": [float("nan")] * 5})
