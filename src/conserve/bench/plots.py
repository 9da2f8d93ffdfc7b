"""The coserve figures. matplotlib is optional and imported only here, when plotting: without it the
run still writes its tables and JSON."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from conserve.bench.compare import SystemResult

if TYPE_CHECKING:
    from conserve.bench.tradeoff import TradeoffPoint


def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # pyplot keeps every figure open until closed


def _cdf(ax, values: list[float], label: str) -> None:
    xs = sorted(values)
    if xs:
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)


def latency_cdf(plt, results: Sequence[SystemResult], path: str) -> None:
    fig, (ttft_ax, itl_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        reqs = (r.report or {}).get("requests", [])
        _cdf(ttft_ax, [q["ttft_ms"] for q in reqs if q.get("ttft_ms") is not None], r.name)
        _cdf(itl_ax, [x for q in reqs for x in q.get("itls_ms") or []], r.name)
    for ax, what in ((ttft_ax, "online TTFT (ms)"), (itl_ax, "online ITL (ms)")):
        ax.set_xscale("log")  # tails span orders of magnitude between systems
        ax.set_xlabel(what)
        ax.set_ylabel("fraction of samples")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ttft_ax.set_title("Time to first token")
    itl_ax.set_title("Inter-token latency")
    _save(plt, fig, path)


def throughput_bars(plt, results: Sequence[SystemResult], path: str) -> None:
    names = [r.name for r in results]
    online = [r.summary.get("online_throughput_tok_s", 0.0) for r in results]
    offline = [r.summary.get("offline_throughput_tok_s", 0.0) for r in results]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(names) + 2), 4.5))
    ax.bar(names, online, label="online")
    ax.bar(names, offline, bottom=online, label="offline")
    ax.set_ylabel("tokens/s (prompt + generated)")
    ax.set_title("Throughput per system")
    ax.legend()
    ax.tick_params(axis="x", labelrotation=30)
    _save(plt, fig, path)


def timeline(plt, result: SystemResult, path: str) -> None:
    rows = (result.report or {}).get("timeline", [])
    fig, ax = plt.subplots(figsize=(10, 4))
    ts = [b["t_s"] for b in rows]
    ax.step(ts, [b["online_tok_s"] for b in rows], where="post", label="online")
    ax.step(ts, [b["offline_tok_s"] for b in rows], where="post", label="offline")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{result.name}: online and offline throughput over the run")
    ax.grid(True, alpha=0.3)
    ax.legend()
    _save(plt, fig, path)


def _pyplot():
    """matplotlib.pyplot drawing to files only (no display on a server), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


NO_MATPLOTLIB = "matplotlib is not installed: no plots (pip install matplotlib)"


def write_plots(results: Sequence[SystemResult], out_dir: str) -> tuple[list[str], list[str]]:
    """(paths written, notes about what was skipped)."""
    plt = _pyplot()
    if plt is None:
        return [], [NO_MATPLOTLIB]
    ran = [r for r in results if r.ok and r.report]
    if not ran:
        return [], ["no system ran: no plots"]
    written, notes = [], []
    for name, draw in (("coserve_latency_cdf.png", latency_cdf), ("coserve_throughput.png", throughput_bars)):
        path = os.path.join(out_dir, name)
        draw(plt, ran, path)
        written.append(path)
    conserve = next((r for r in ran if r.name == "conserve"), None)
    if conserve is None:
        notes.append("no timeline plot: the conserve system did not run")
    else:
        path = os.path.join(out_dir, "coserve_timeline.png")
        timeline(plt, conserve, path)
        written.append(path)
    return written, notes


def tradeoff(plt, points: Sequence[TradeoffPoint], path: str, latency_limit: float, offline_goal: float) -> None:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    families: dict[str, list[TradeoffPoint]] = {}
    for p in points:
        families.setdefault(p.family, []).append(p)
    for family, pts in families.items():
        xs, ys = [p.online_p99_ratio for p in pts], [p.offline_fraction for p in pts]
        ax.plot(xs, ys, marker="o", label=family)  # a family's knob values in sweep order, joined
        for p in pts:
            if p.knob:
                ax.annotate(p.knob.split()[-1], (p.online_p99_ratio, p.offline_fraction), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
    ax.axvline(latency_limit, linestyle="--", color="gray", label=f"P99 ratio {latency_limit:g}x")
    ax.axhline(offline_goal, linestyle="--", color="gray", label=f"offline {offline_goal:.0%} of bound")
    ax.set_xscale("log")  # a policy that ignores online latency is orders of magnitude off
    from matplotlib.ticker import LogFormatter  # plain numbers: 2, not 2x10^0, on a narrow range

    ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_xlabel("online P99 ratio: max(TTFT, ITL) over the no-offline-load reference's (lower is better)")
    ax.set_ylabel("offline throughput / its engine's non-preemptive run's (higher is better)")
    ax.set_title("Co-serving trade-off: knob values annotated, goal top left of the dashed lines")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save(plt, fig, path)


def write_tradeoff_plot(points: Sequence[TradeoffPoint], out_dir: str, latency_limit: float,
                        offline_goal: float) -> tuple[str | None, list[str]]:
    """(the path written or None, notes about why not)."""
    plt = _pyplot()
    if plt is None:
        return None, [NO_MATPLOTLIB]
    # a log axis has no place for 0 (a run without ITL samples)
    drawn = [p for p in points if (p.online_p99_ratio or 0) > 0 and p.offline_fraction is not None]
    if not drawn:
        return None, ["no trade-off plot: no system has both ratios (did online-only and non-preemptive run?)"]
    path = os.path.join(out_dir, "coserve_tradeoff.png")
    tradeoff(plt, drawn, path, latency_limit, offline_goal)
    return path, []
