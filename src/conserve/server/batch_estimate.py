"""What a batch costs, how far it got, and when it will be done. Pure Python.

Work is counted in the unit the harvest rate counts: token positions computed, a line's prompt tokens
plus its generated tokens. Before a line runs its output length is unknown; it is costed at its
max_tokens until lines finish, then at max_tokens times the share of max_tokens that finished lines
actually generated (lines stop early at EOS).

The estimate treats the offline queue as one server working through the batches in the order the
scheduler serves them (earliest deadline first, or arrival order with deadlines off) at the measured
harvest rate: a batch is done when the work ahead of it and its own remaining work are.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

_WINDOW = re.compile(r"(\d+)([mhd])")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400}
MIN_WINDOW_S, MAX_WINDOW_S = 60, 7 * 86400


def window_seconds(window: object) -> int | None:
    """A completion_window ("24h" as OpenAI; also minutes, hours or days such as "30m", "2h", "3d",
    from 1 minute to 7 days) in seconds, or None when it is not one."""
    m = _WINDOW.fullmatch(window) if isinstance(window, str) else None
    if m is None:
        return None
    seconds = int(m.group(1)) * _UNIT_S[m.group(2)]
    return seconds if MIN_WINDOW_S <= seconds <= MAX_WINDOW_S else None


def rough_cost(endpoint: str, body: dict) -> tuple[int, int]:
    """(prompt tokens, most output tokens) of a line without a tokenizer: ~4 characters a token. For
    runners without the model's tokenizer (tests); the server counts real tokens."""
    if endpoint.endswith("/chat/completions"):
        text = "".join(str(m.get("content", "")) for m in body.get("messages", []) if isinstance(m, dict))
    else:
        text = str(body.get("prompt", ""))
    out = body.get("max_completion_tokens") or body.get("max_tokens") or 16
    return max(1, len(text) // 4), int(out) if isinstance(out, int) and out > 0 else 16


@dataclass
class BatchWork:
    """The cost of one batch's lines, and what is done of it."""

    pending: dict[int, tuple[int, int]] = field(default_factory=dict)  # line -> (prompt, max output)
    done_tokens: float = 0.0  # positions computed by finished lines
    _asked: int = 0  # max output tokens of lines finished here, and what they generated
    _got: int = 0

    def add_line(self, line: int, prompt: int, max_out: int, finished: bool = False) -> None:
        if finished:  # finished before this process started: costed as it was planned
            self.done_tokens += prompt + max_out
        else:
            self.pending[line] = (prompt, max_out)

    def finish_line(self, line: int, usage: dict | None) -> None:
        """A line finished; usage: its response's token counts (None for a failed line)."""
        prompt, max_out = self.pending.pop(line, (0, 0))
        if usage is None:
            return
        got = usage.get("completion_tokens", 0)
        self.done_tokens += usage.get("prompt_tokens", prompt) + got
        self._asked += max_out
        self._got += min(got, max_out) if max_out else got

    @property
    def output_share(self) -> float:
        """Share of max_tokens that lines generate, as far as finished lines tell (1 until they do)."""
        return self._got / self._asked if self._asked else 1.0

    @property
    def remaining_tokens(self) -> float:
        share = self.output_share
        return sum(prompt + max_out * share for prompt, max_out in self.pending.values())

    @property
    def progress(self) -> float:
        total = self.done_tokens + self.remaining_tokens
        return self.done_tokens / total if total else 1.0


def completion_times(queue: list[float], rate: float | None, now: float) -> list[float | None]:
    """queue: remaining work of each batch, in the order they are served. When each is done, working
    through them one after another at `rate` positions a second (None without a rate)."""
    if rate is None or not rate > 0 or not math.isfinite(rate):
        return [None] * len(queue)
    done_at, ahead = [], 0.0
    for work in queue:
        ahead += work
        done_at.append(now + ahead / rate)
    return done_at
