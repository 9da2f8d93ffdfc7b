"""Replay an arrival trace in the Azure LLM inference trace schema.

The CSV has columns TIMESTAMP, ContextTokens, GeneratedTokens (names matched case-insensitively).
TIMESTAMP is either a number of seconds or a datetime such as `2023-11-16 18:15:46.6805900` (the 2023
trace: seven fractional digits, no zone) or `2024-05-10 00:00:00.009930+00:00` (the 2024 trace).
Only differences between timestamps matter: the first row arrives at time 0.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from datetime import datetime, timezone

COLUMNS = ("timestamp", "contexttokens", "generatedtokens")
# date and time to the second, optional fraction of any length, optional zone
_DATETIME = re.compile(r"^(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2})(?:\.(\d+))?\s*(Z|[+-]\d{2}:?\d{2})?$")


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # after the first row, already divided by the rate scale
    input_len: int
    output_len: int


def parse_timestamp(text: str) -> float:
    """Seconds (since the epoch for datetimes; only differences are used). Naive datetimes are UTC,
    so daylight-saving changes on this machine cannot bend the trace."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    m = _DATETIME.match(text)
    if m is None:
        raise ValueError(f"unrecognised TIMESTAMP {text!r}: expected seconds or 'YYYY-MM-DD HH:MM:SS[.frac]'")
    base, frac, zone = m.groups()
    # Python 3.10's fromisoformat takes at most 6 fractional digits: keep the fraction aside.
    zone = "+00:00" if zone in (None, "Z") else zone if ":" in zone else zone[:3] + ":" + zone[3:]
    dt = datetime.fromisoformat(base.replace("T", " ") + zone)
    return dt.astimezone(timezone.utc).timestamp() + (float("0." + frac) if frac else 0.0)


def load_trace(path: str, rate_scale: float = 1.0, limit: int | None = None, max_input_len: int | None = None,
               max_output_len: int | None = None) -> list[TraceRequest]:
    """Rows sorted by time, the first `limit` of them; rate_scale X makes arrivals X times as frequent
    (gaps divided by X). Token counts are clipped to the max lengths and to at least 1."""
    if rate_scale <= 0:
        raise ValueError(f"trace rate scale must be > 0, got {rate_scale}")
    rows: list[tuple[float, int, int]] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
        missing = [c for c in COLUMNS if c not in fields]
        if missing:
            raise ValueError(f"trace {path} lacks column(s) {', '.join(missing)}; expected "
                             "TIMESTAMP,ContextTokens,GeneratedTokens")
        ts, ctx, gen = (fields[c] for c in COLUMNS)
        for line, row in enumerate(reader, start=2):
            try:
                rows.append((parse_timestamp(row[ts] or ""), int(float(row[ctx])), int(float(row[gen]))))
            except (TypeError, ValueError) as e:
                raise ValueError(f"trace {path} line {line}: {e}") from None
    if not rows:
        raise ValueError(f"trace {path} has no rows")
    rows.sort(key=lambda r: r[0])
    if limit is not None:
        rows = rows[:limit]
    t0 = rows[0][0]
    return [TraceRequest((t - t0) / rate_scale, _clip(i, max_input_len), _clip(o, max_output_len))
            for t, i, o in rows]


def _clip(n: int, most: int | None) -> int:
    return max(1, min(n, most) if most is not None else n)
