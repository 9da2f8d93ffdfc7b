"""Latency statistics, goodput and the per-second timeline, with vLLM's definitions:
TTFT = send -> first generated chunk; ITL = gaps between successive chunks (pooled over requests);
TPOT = (E2EL - TTFT) / (output tokens - 1) per request (requests with one token have none);
E2EL = send -> end of stream. Only successful requests enter the statistics.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

from conserve.bench.client import RequestResult

METRICS = ("ttft", "tpot", "itl", "e2el")


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method); 0.0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * p / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def percentile_key(p: float) -> str:
    return f"p{int(p)}" if float(p).is_integer() else f"p{p:g}"


def parse_percentiles(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"bad --percentiles {text!r}: expected numbers such as 50,90,99") from None


def parse_goodput(specs: Iterable[str]) -> dict[str, float]:
    """['ttft:200', 'tpot:50'] -> {'ttft': 200.0, 'tpot': 50.0}: SLOs in milliseconds, as vLLM's --goodput."""
    slos: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition(":")
        name = name.strip().lower()
        try:
            ms = float(value)
        except ValueError:
            ms = math.nan
        if not sep or name not in ("ttft", "tpot", "e2el") or not ms >= 0:
            raise ValueError(f"bad --goodput {spec!r}: expected NAME:MS with NAME ttft, tpot or e2el and MS >= 0")
        slos[name] = ms
    return slos


def meets_slos(res: RequestResult, slos: dict[str, float]) -> bool:
    values_ms = {"ttft": res.ttft * 1e3, "tpot": (res.tpot or 0.0) * 1e3, "e2el": res.e2el * 1e3}
    return all(values_ms[name] <= slo for name, slo in slos.items())


def stats(name: str, values_s: Sequence[float], percentiles: Iterable[float]) -> dict[str, float]:
    """mean/median/std and the percentiles of one metric, in ms (keys such as p99_ttft_ms)."""
    ms = [v * 1e3 for v in values_s]
    out = {f"mean_{name}_ms": statistics.fmean(ms) if ms else 0.0,
           f"median_{name}_ms": statistics.median(ms) if ms else 0.0,
           f"std_{name}_ms": statistics.pstdev(ms) if ms else 0.0}
    for p in sorted(set(percentiles) | {90.0, 99.0}):  # p90 and p99 are always reported
        out[f"{percentile_key(p)}_{name}_ms"] = percentile(ms, p)
    return out


def summarize(results: Sequence[RequestResult], duration_s: float, percentiles: Iterable[float] = (90, 99),
              goodput: dict[str, float] | None = None) -> dict:
    """The online metrics of a run. prompt_tokens must be filled in (usage or the requested length)."""
    ok = [r for r in results if r.ok]
    inputs = sum(r.prompt_tokens or 0 for r in ok)
    outputs = sum(r.output_tokens for r in ok)
    duration = max(duration_s, 1e-9)
    out: dict = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration_s,
                 "total_input_tokens": inputs, "total_output_tokens": outputs,
                 "request_throughput": len(ok) / duration, "output_throughput": outputs / duration,
                 "total_token_throughput": (inputs + outputs) / duration,
                 "goodput": sum(meets_slos(r, goodput) for r in ok) / duration if goodput else None}
    per_metric = {"ttft": [r.ttft for r in ok], "tpot": [r.tpot for r in ok if r.tpot is not None],
                  "itl": [x for r in ok for x in r.itls], "e2el": [r.e2el for r in ok]}
    percentiles = list(percentiles)
    for name in METRICS:
        out.update(stats(name, per_metric[name], percentiles))
    out["online_throughput_tok_s"] = out["total_token_throughput"]
    return out


def timeline(online: Sequence[RequestResult], offline: Sequence[RequestResult], t0: float, duration_s: float,
             batch_samples: Sequence[tuple[float, int]] = (), tokens_per_batch_line: int = 0) -> list[dict]:
    """Tokens per second in one-second buckets from t0: a request's prompt tokens count when its first
    chunk arrives, its generated tokens are spread evenly over its chunks; batch lines count
    (input + output length each) at the poll that saw them complete. The last bucket may be partial."""
    n = max(1, math.ceil(duration_s))
    on, off = [0.0] * n, [0.0] * n

    def bucket(t: float) -> int:
        return min(max(int(t - t0), 0), n - 1)

    for results, acc in ((online, on), (offline, off)):
        for r in results:
            if not r.ok or not r.chunk_times:
                continue
            acc[bucket(r.chunk_times[0])] += r.prompt_tokens or 0
            share = r.output_tokens / len(r.chunk_times)
            for t in r.chunk_times:
                acc[bucket(t)] += share
    last = 0
    for t, done in batch_samples:
        off[bucket(t)] += (done - last) * tokens_per_batch_line
        last = done
    return [{"t_s": i, "online_tok_s": on[i], "offline_tok_s": off[i]} for i in range(n)]
