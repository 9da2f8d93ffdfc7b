"""The latency model fits, predicts, refines and persists; pure Python at prediction time."""

import random

import pytest

from conserve.sched.latency_model import (IterationShape, LatencyModel, Sample, decode_batch, median,
                                          prefill_chunk)


def true_time(shape):
    p, d, r = shape.tokens, shape.decode_reads, shape.prefill_reads
    return 0.004 + 2e-4 * p + 1e-8 * p * p + 1e-6 * d + 3e-9 * r + 1e-9 * p * d


def grid(noise=0.0, seed=0, scale=1.0):
    rng = random.Random(seed)
    shapes = [decode_batch(b, c) for b in (1, 2, 4, 8, 16, 32, 64, 128) for c in (64, 512, 2048)]
    shapes += [prefill_chunk(n, c + n) for n in (16, 64, 256, 512, 1024) for c in (0, 64, 512, 2048)]
    return [Sample(s, scale * true_time(s) * (1 + rng.uniform(-noise, noise))) for s in shapes]


def mixed(decodes, context, chunk, chunk_context):
    shape = decode_batch(decodes, context)
    shape.add(chunk, chunk_context + chunk)
    return shape


def test_shape_accounts_decodes_by_the_longest_context_and_prefill_by_reads():
    shape = IterationShape()
    shape.add(1, 100)
    shape.add(1, 300)
    shape.add(50, 250)
    assert (shape.tokens, shape.num_decodes, shape.decode_reads, shape.prefill_reads) == (52, 2, 600, 12500)
    assert shape.plus(1, 1000).decode_reads == 3000 and shape.decode_reads == 600  # plus() copies


def test_fit_recovers_a_known_surface_and_generalises():
    model = LatencyModel.fit(grid(noise=0.03))
    held_out = [decode_batch(3, 100), decode_batch(48, 700), prefill_chunk(700, 900), mixed(16, 512, 128, 512)]
    errors = model.relative_errors([Sample(s, true_time(s)) for s in held_out])
    assert median(errors) < 0.05 and max(errors) < 0.15


def test_coefficients_stay_non_negative_so_predictions_grow_with_work():
    # A surface whose unconstrained fit would take a negative P² term.
    samples = [Sample(prefill_chunk(n, n), 0.01 + 1e-3 * n - 1e-7 * n * n) for n in (16, 64, 256, 512, 1024, 2048)]
    samples += [Sample(decode_batch(b, 64), 0.01 + 1e-3 * b) for b in (1, 4, 16)]
    model = LatencyModel.fit(samples)
    assert all(c >= 0 for c in model.coefficients)
    assert model.predict(prefill_chunk(2048, 2048)) > model.predict(prefill_chunk(1024, 1024))
    assert LatencyModel([0.0] * 6).predict(decode_batch(1, 1)) == 0.0


def test_too_few_samples_is_an_error():
    with pytest.raises(ValueError, match="at least"):
        LatencyModel.fit(grid()[:3])


def test_observe_refits_toward_the_machine_it_runs_on():
    model = LatencyModel.fit(grid())
    slower = grid(seed=1, scale=2.0)
    refits = 0
    for _ in range(40):
        for s in slower:
            refits += model.observe(s.shape, s.seconds, refit_every=64)
    assert refits > 0
    # The profiled grid stays in every refit, so the model moves most of the way, not all of it.
    ratio = model.predict(decode_batch(32, 512)) / true_time(decode_batch(32, 512))
    assert 1.6 < ratio < 2.05
    assert len(model.recent) <= model.recent.maxlen


def test_json_round_trip_keeps_the_profiled_grid_and_rejects_malformed(tmp_path):
    model = LatencyModel.fit(grid())
    path = tmp_path / "lat" / "model.json"
    model.save(path)
    loaded = LatencyModel.load(path)
    assert loaded.coefficients == model.coefficients
    assert [(s.shape, s.seconds) for s in loaded.base] == [(s.shape, s.seconds) for s in model.base]
    with pytest.raises(ValueError):
        LatencyModel.from_json({"features": ["1"], "coefficients": [1.0]})
    with pytest.raises(ValueError):
        LatencyModel.from_json({**model.to_json(), "coefficients": [float("nan")] * 6})
    path.write_text("not json")
    with pytest.raises(ValueError, match="not a latency model"):
        LatencyModel.load(path)


def test_a_steady_serving_overhead_corrects_predictions_before_any_refit():
    model = LatencyModel.fit(grid())
    shape = decode_batch(16, 512)
    base = model.predict(shape)
    for s in grid(seed=2):
        # serving costs 20% more (under the drift threshold, which refits at once)
        model.observe(s.shape, 1.2 * s.seconds, refit_every=10**9)
    assert model.predict(shape) == pytest.approx(1.2 * base, rel=0.05)
    model.observe(shape, 100.0, refit_every=10**9)  # one wild outlier moves it by at most a few percent
    assert model.predict(shape) < 1.5 * base


def test_sustained_drift_refits_at_once_and_a_blip_does_not():
    from conserve.sched.latency_model import DRIFT_WINDOW, LatencyModel, Sample, decode_batch, prefill_chunk

    truth = [0.01, 0.001, 0.0, 0.0, 0.0, 0.0]
    grid = [Sample(s, LatencyModel(truth).predict(s)) for s in
            [decode_batch(b, 64) for b in (1, 4, 16, 64)] + [prefill_chunk(n, n) for n in (16, 64, 256, 512)]]
    model = LatencyModel.fit(grid)
    shape = prefill_chunk(128, 128)
    for _ in range(DRIFT_WINDOW - 1):  # a blip: not long enough
        assert not model.observe(shape, 2 * model._fitted(shape), refit_every=10_000)
    model.observe(shape, model._fitted(shape), refit_every=10_000)  # back on the fit: the run restarts
    for _ in range(DRIFT_WINDOW - 1):
        assert not model.observe(shape, 2 * model._fitted(shape), refit_every=10_000)
    assert model.drift_refits == 0
    assert model.observe(shape, 2.2 * model._fitted(shape), refit_every=10_000)  # sustained: refit now
    assert model.drift_refits == 1
    assert abs(model.predict(shape) / (2.2 * LatencyModel(truth).predict(shape)) - 1) < 0.25


def test_decode_reads_follow_the_attention_path():
    # Padded decode attention (gather) reads every decode at the longest context; the paged kernel
    # reads each request's own context: a long request must not be charged to the short ones.
    shape = IterationShape().plus(1, 100).plus(1, 1000)
    model = LatencyModel([0.0, 0.0, 0.0, 1e-6])  # D only
    assert model.predict(shape) == pytest.approx(2000e-6)
    model.padded_decode = False
    assert model.predict(shape) == pytest.approx(1100e-6)
    assert IterationShape.from_json(shape.to_json()) == shape


def test_throughput_leaves_out_prefill_attention_only():
    from conserve.sched.plan import throughput

    # Decode reads still count under the paged kernel (summed contexts); only R is left out.
    shape = IterationShape().plus(1, 100).plus(1, 1000).plus(64, 64)
    model = LatencyModel([0.01, 0.0, 0.0, 1e-6, 1e-3])
    model.padded_decode = False
    assert throughput(model, shape) == pytest.approx(66 / (0.01 + 1100e-6))
