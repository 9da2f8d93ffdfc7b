"""The result table, laid out like `vllm bench serve`'s so the numbers read the same way."""

from __future__ import annotations

from conserve.bench.metrics import percentile_key

WIDTH = 50
SECTIONS = (("ttft", "TTFT", "Time to First Token"), ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
            ("itl", "ITL", "Inter-token Latency"), ("e2el", "E2EL", "End-to-end Latency"))


def _row(label: str, value: object) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}"
    return f"{label:<40} {value:<10}"


def _title(text: str, fill: str = "-") -> str:
    return f" {text} ".center(WIDTH, fill) if fill == "=" else text.center(WIDTH, fill)


def format_table(report: dict, percentiles: list[float]) -> str:
    lines = [_title("Serving Benchmark Result", "="),
             _row("Successful requests:", report["completed"]),
             _row("Failed requests:", report["failed"]),
             _row("Benchmark duration (s):", report["duration_s"]),
             _row("Total input tokens:", report["total_input_tokens"]),
             _row("Total generated tokens:", report["total_output_tokens"]),
             _row("Request throughput (req/s):", report["request_throughput"])]
    if report.get("goodput") is not None:
        lines.append(_row("Request goodput (req/s):", report["goodput"]))
    lines += [_row("Output token throughput (tok/s):", report["output_throughput"]),
              _row("Total token throughput (tok/s):", report["total_token_throughput"])]
    shown = sorted(set(percentiles) | {90.0, 99.0})
    for key, short, title in SECTIONS:
        lines.append(_title(title))
        lines.append(_row(f"Mean {short} (ms):", report[f"mean_{key}_ms"]))
        lines.append(_row(f"Median {short} (ms):", report[f"median_{key}_ms"]))
        for p in shown:
            pk = percentile_key(p)
            lines.append(_row(f"{pk.upper()} {short} (ms):", report[f"{pk}_{key}_ms"]))
    if report.get("offline_mode", "none") != "none":
        lines += [_title("Co-serving"),
                  _row("Offline mode:", report["offline_mode"]),
                  _row("Offline requests completed:", report["offline_completed"]),
                  _row("Offline requests failed:", report["offline_failed"]),
                  _row("Offline throughput (tok/s):", report["offline_throughput_tok_s"]),
                  _row("Online throughput (tok/s):", report["online_throughput_tok_s"]),
                  _row("Total throughput (tok/s):", report["total_throughput_tok_s"])]
    lines.append("=" * WIDTH)
    return "\n".join(lines)
