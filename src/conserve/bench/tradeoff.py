"""The sweep's trade-off points: how much online latency each setting costs (x: P99 TTFT and ITL over the
online-only reference's, the worse of the two) for how much offline work it gets done (y: offline
throughput over the non-preemptive bound's); the markdown table, the PNG and the JSON entry. vLLM's rows
are measured against vLLM's own references (its online-only latency, its FCFS offline throughput) when
they ran: each engine's scheduler is judged on what its own engine could do."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from conserve.bench.compare import LATENCY_LIMIT, SystemResult, ratio
from conserve.bench.systems import System

OFFLINE_GOAL = 0.85  # the figure's horizontal line: offline throughput worth having, as a fraction of the bound
BOUND = "non-preemptive"
VLLM_BOUND = "vllm-non-preemptive"
LATENCY_REFERENCES = ("online-only", "vllm-online-only")  # no offline load: not points themselves


@dataclass
class TradeoffPoint:
    system: str  # the run's name, e.g. conserve-tbt50
    family: str  # the series it belongs to, e.g. conserve
    knob: str  # the setting that differs, e.g. "--slo-tbt-ms 50"; "" for a system run once
    status: str  # the run's status; only "ok" runs have numbers
    latency_reference: str
    bound_reference: str = BOUND
    ttft_ratio: float | None = None
    itl_ratio: float | None = None
    online_p99_ratio: float | None = None  # x: the worse of the two ratios
    offline_fraction: float | None = None  # y
    total_tok_s: float | None = None


def latency_reference(family: str, ran: Mapping[str, dict]) -> str:
    """vLLM's rows are measured against vLLM without offline load when it ran: same engine, same costs."""
    return "vllm-online-only" if family.startswith("vllm-") and "vllm-online-only" in ran else "online-only"


def bound_reference(family: str, ran: Mapping[str, dict]) -> str:
    return VLLM_BOUND if family.startswith("vllm-") and VLLM_BOUND in ran else BOUND


def tradeoff_point(system: System, summary: dict, reference: dict | None, bound: dict | None,
                   reference_name: str = "online-only", bound_name: str = BOUND) -> TradeoffPoint:
    """One ran system's point; a missing reference (or one with zero values) leaves its ratios None."""
    point = TradeoffPoint(system.name, system.family_name, system.knob, "ok", reference_name, bound_name,
                          total_tok_s=summary["total_throughput_tok_s"])
    if reference is not None:
        point.ttft_ratio = ratio(summary["p99_ttft_ms"], reference["p99_ttft_ms"])
        point.itl_ratio = ratio(summary["p99_itl_ms"], reference["p99_itl_ms"])
        if point.ttft_ratio is not None and point.itl_ratio is not None:
            point.online_p99_ratio = max(point.ttft_ratio, point.itl_ratio)
    if bound is not None:
        point.offline_fraction = ratio(summary["offline_throughput_tok_s"], bound["offline_throughput_tok_s"])
    return point


def tradeoff_points(runs: Sequence[tuple[System, SystemResult]]) -> list[TradeoffPoint]:
    """Every run but the references, in run order; those that did not run keep a row with their status."""
    ran = {r.name: r.summary for _, r in runs if r.ok}
    points = []
    for system, res in runs:
        if system.name in (BOUND, VLLM_BOUND, *LATENCY_REFERENCES):
            continue
        ref, bound = latency_reference(system.family_name, ran), bound_reference(system.family_name, ran)
        if not res.ok:
            points.append(TradeoffPoint(system.name, system.family_name, system.knob, res.status, ref, bound))
            continue
        points.append(tradeoff_point(system, res.summary, ran.get(ref), ran.get(bound), ref, bound))
    return points


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def format_tradeoff(points: Sequence[TradeoffPoint]) -> str:
    """A markdown table, one row per run."""
    lines = ["| system | knob | P99 TTFT ratio | P99 ITL ratio | offline fraction of bound | total tok/s |",
             "|---|---|---|---|---|---|"]
    for p in points:
        knob = p.knob or "(defaults)"
        if p.status != "ok":
            lines.append(f"| {p.family} | {knob} | {p.status} | | | |")
            continue
        frac = "n/a" if p.offline_fraction is None else f"{p.offline_fraction:.0%}"
        lines.append(f"| {p.family} | {knob} | {_x(p.ttft_ratio)} | {_x(p.itl_ratio)} | {frac} | "
                     f"{p.total_tok_s:.1f} |")
    refs = sorted({p.latency_reference for p in points})
    lines += ["", f"Ratios: P99 over the latency reference's ({', '.join(refs) or 'online-only'}; vLLM rows use "
              f"vllm-online-only when it ran). Offline fraction: offline tok/s over {BOUND}'s ({VLLM_BOUND}'s "
              f"for vLLM rows when it ran: each engine against its own bound). Goal: both "
              f"ratios <= {LATENCY_LIMIT}x and offline fraction >= {OFFLINE_GOAL:.0%}."]
    return "\n".join(lines)
