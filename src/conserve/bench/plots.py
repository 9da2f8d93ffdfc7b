"""The coserve figures. matplotlib is optional and imported only here, when plotting: without it the
run still writes its tables and JSON."""

from __future__ import annotations

import os
from collections.abc import Sequence

from conserve.bench.compare import SystemResult


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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(results: Sequence[SystemResult], out_dir: str) -> tuple[list[str], list[str]]:
    """(paths written, notes about what was skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a server
        import matplotlib.pyplot as plt
    except ImportError:
        return [], ["matplotlib is not installed: no plots (pip install matplotlib)"]
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
