"""The offline tokens/s a batch can expect now: what its completion estimate divides by."""

from __future__ import annotations

from conserve.engine import Engine
from conserve.sched.latency_model import decode_batch

# With no offline work running to measure, the rate is predicted for a typical offline iteration:
# this many decodes at this context each (batch lines are mostly decode time).
_TYPICAL_BATCH, _TYPICAL_CONTEXT = 32, 256


def harvest_rate(engine: Engine | None) -> float | None:
    """The measured harvest (offline positions computed per second over the last seconds) or, when
    no offline work ran lately, the latency model's offline throughput scaled by the share of time
    online work leaves free. None when neither is known (no engine, no latency model)."""
    if engine is None:
        return None
    measured = engine.stats.harvest_rate()
    if measured is not None and measured > 0:
        return measured
    return predicted_harvest(engine)


def predicted_harvest(engine: Engine) -> float | None:
    """The latency model's offline throughput scaled by the share of time online work leaves free: what
    offline work could get here now, however much of it runs (None without a latency model)."""
    model = engine.latency_model
    if model is None:
        return None
    batch = min(_TYPICAL_BATCH, engine.config.max_num_seqs)
    seconds = model.predict(decode_batch(batch, _TYPICAL_CONTEXT))
    if not seconds > 0:
        return None
    return batch / seconds * max(0.05, 1 - engine.stats.online_time_share())
