"""The outcome of each system, one comparison table, and the co-serving targets checked on the numbers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# the report's bulky or per-run parts; everything else is the summary (vllm bench serve key names)
_NOT_SUMMARY = ("requests", "timeline", "config")

LATENCY_LIMIT = 1.2  # conserve's P99 TTFT and ITL vs online-only
OFFLINE_SHARE = 0.8  # conserve's offline throughput vs non-preemptive
TOTAL_GAIN = 2.0  # conserve's total throughput vs online-only
TTFT_GAIN_VS_VLLM = 3.0  # vllm-priority's P99 TTFT / conserve's
TITLES = {"latency": f"conserve P99 TTFT and ITL within {LATENCY_LIMIT}x of online-only",
          "offline": f"conserve offline throughput >= {OFFLINE_SHARE:.0%} of non-preemptive's",
          "total": f"conserve total throughput >= {TOTAL_GAIN}x online-only's",
          "vs-vllm": f"conserve P99 TTFT >= {TTFT_GAIN_VS_VLLM}x lower than vllm-priority's, at >= its total "
                     "throughput"}


@dataclass
class SystemResult:
    name: str
    description: str
    status: str  # "ok", "failed", "not run" or "interrupted"
    error: str | None = None  # why it failed or did not run
    summary: dict = field(default_factory=dict)
    report: dict | None = None  # the full run_benchmark report
    server_command: list[str] = field(default_factory=list)
    log_path: str | None = None  # the server's stdout and stderr
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def summarize_report(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in _NOT_SUMMARY}


@dataclass
class Target:
    key: str
    title: str
    status: str  # "PASS", "MISS" or "not evaluated"
    detail: str
    values: dict[str, float] = field(default_factory=dict)


def _target(key: str, status: str, detail: str, values: dict[str, float] | None = None) -> Target:
    return Target(key, TITLES[key], status, detail, values or {})


def ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _latency(s: Mapping[str, dict]) -> Target:
    c, o = s["conserve"], s["online-only"]
    ratios = {m: ratio(c[f"p99_{m}_ms"], o[f"p99_{m}_ms"]) for m in ("ttft", "itl", "tpot")}
    parts = [f"P99 {m.upper()} {c[f'p99_{m}_ms']:.1f} vs {o[f'p99_{m}_ms']:.1f} ms "
             f"({'n/a' if r is None else f'{r:.2f}x'})" for m, r in ratios.items()]
    detail = "; ".join(parts) + " (TPOT shown only)"
    if ratios["ttft"] is None or ratios["itl"] is None:
        return _target("latency", "not evaluated", "online-only has no TTFT/ITL samples; " + detail)
    ok = ratios["ttft"] <= LATENCY_LIMIT and ratios["itl"] <= LATENCY_LIMIT
    return _target("latency", _verdict(ok), detail, {f"{m}_ratio": r for m, r in ratios.items() if r is not None})


def _offline(s: Mapping[str, dict]) -> Target:
    return _throughput_ratio(s, "offline", "offline_throughput_tok_s", "non-preemptive", OFFLINE_SHARE, "{:.0%}",
                             "non-preemptive completed no offline work")


def _total(s: Mapping[str, dict]) -> Target:
    return _throughput_ratio(s, "total", "total_throughput_tok_s", "online-only", TOTAL_GAIN, "{:.2f}x",
                             "online-only has zero throughput")


def _throughput_ratio(s: Mapping[str, dict], name: str, key: str, baseline: str, at_least: float, fmt: str,
                      why_none: str) -> Target:
    """conserve's `key` over the baseline system's, which must reach at_least."""
    c, b = s["conserve"][key], s[baseline][key]
    r = ratio(c, b)
    detail = f"{c:.1f} vs {b:.1f} tok/s ({'n/a' if r is None else fmt.format(r)})"
    if r is None:
        return _target(name, "not evaluated", f"{why_none}; " + detail)
    return _target(name, _verdict(r >= at_least), detail, {"ratio": r})


def _vs_vllm(s: Mapping[str, dict]) -> Target:
    c, v = s["conserve"], s["vllm-priority"]
    gain = ratio(v["p99_ttft_ms"], c["p99_ttft_ms"])
    detail = (f"P99 TTFT {c['p99_ttft_ms']:.1f} vs {v['p99_ttft_ms']:.1f} ms "
              f"({'n/a' if gain is None else f'{gain:.2f}x lower'}); total "
              f"{c['total_throughput_tok_s']:.1f} vs {v['total_throughput_tok_s']:.1f} tok/s")
    if gain is None:
        return _target("vs-vllm", "not evaluated", "conserve has no TTFT samples; " + detail)
    ok = gain >= TTFT_GAIN_VS_VLLM and c["total_throughput_tok_s"] >= v["total_throughput_tok_s"]
    return _target("vs-vllm", _verdict(ok), detail, {"ttft_gain": gain})


_CHECKS = (("latency", _latency, "online-only"), ("offline", _offline, "non-preemptive"),
           ("total", _total, "online-only"), ("vs-vllm", _vs_vllm, "vllm-priority"))


def check_targets(summaries: Mapping[str, dict]) -> list[Target]:
    """summaries: system name -> summary, for the systems that ran (others are simply absent)."""
    out = []
    for key, check, other in _CHECKS:
        absent = [n for n in ("conserve", other) if n not in summaries]
        if absent:
            out.append(_target(key, "not evaluated", f"no results for {', '.join(absent)}"))
        else:
            out.append(check(summaries))
    return out


def format_targets(targets: Sequence[Target]) -> str:
    lines = ["Targets:"]
    for t in targets:
        lines.append(f"  {t.status:<13} {t.title}: {t.detail}")
    return "\n".join(lines)


COLUMNS = (("p99 TTFT ms", "p99_ttft_ms"), ("p99 TPOT ms", "p99_tpot_ms"), ("p99 ITL ms", "p99_itl_ms"),
           ("mean TTFT ms", "mean_ttft_ms"), ("online tok/s", "online_throughput_tok_s"),
           ("offline tok/s", "offline_throughput_tok_s"), ("total tok/s", "total_throughput_tok_s"))


def format_comparison(results: Sequence[SystemResult]) -> str:
    name_w = max([len("system"), *(len(r.name) for r in results)])
    head = [f"{'system':<{name_w}}", *(f"{h:>13}" for h, _ in COLUMNS), f"{'failed':>8}"]
    lines = ["  ".join(head)]
    lines.append("-" * len(lines[0]))
    for r in results:
        if not r.ok:
            reason = r.error.strip().splitlines()[0] if r.error and r.error.strip() else ""
            reason = reason if len(reason) <= 160 else reason[:157] + "..."
            lines.append(f"{r.name:<{name_w}}  {r.status}" + (f": {reason}" if reason else ""))
            continue
        s = r.summary
        failed = str(s.get("failed", 0)) + (f"+{s['offline_failed']}off" if s.get("offline_failed") else "")
        cells = [f"{r.name:<{name_w}}", *(f"{s.get(k, 0.0):>13.1f}" for _, k in COLUMNS), f"{failed:>8}"]
        lines.append("  ".join(cells))
    return "\n".join(lines)
