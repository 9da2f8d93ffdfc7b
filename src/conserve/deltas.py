"""Streamed outputs as deltas: what is new since the last delivery, never a copy of everything so far.

The engine returns cumulative outputs (the `LLM` API and `conserve generate` want those). The async
engine turns them into deltas on the engine thread (`DeltaTracker`), each stream keeps at most one
pending delta that later ones coalesce into (`DeltaBuffer`), and consumers that want the whole output
rebuild it (`Accumulator`). A slow reader therefore costs O(output) memory, not O(output^2).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from conserve.outputs import CompletionOutput, RequestOutput, TokenLogprobs


@dataclass
class _Sent:
    chars: int = 0
    tokens: int = 0
    logprobs: int = 0
    finished: bool = False


class DeltaTracker:
    """Engine thread: cumulative RequestOutput -> the part of it not yet handed over."""

    def __init__(self) -> None:
        self._sent: dict[str, dict[int, _Sent]] = {}

    def delta(self, out: RequestOutput) -> RequestOutput:
        sent = self._sent.setdefault(out.request_id, {})
        changed = []
        for o in out.outputs:
            s = sent.setdefault(o.index, _Sent())
            text, token_ids = o.text[s.chars:], o.token_ids[s.tokens:]
            lps = o.logprobs[s.logprobs:] if o.logprobs is not None else None
            newly_finished = o.finish_reason is not None and not s.finished
            if not (text or token_ids or lps or newly_finished):
                continue
            s.chars, s.tokens = len(o.text), len(o.token_ids)
            s.logprobs = len(o.logprobs) if o.logprobs is not None else 0
            s.finished = o.finish_reason is not None
            changed.append(CompletionOutput(o.index, text, token_ids, o.cumulative_logprob, lps,
                                            o.finish_reason, o.stop_reason))
        if out.finished:
            del self._sent[out.request_id]
        return RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, changed, out.finished, out.metrics)

    def forget(self, request_id: str) -> None:
        self._sent.pop(request_id, None)

    def clear(self) -> None:
        self._sent.clear()


@dataclass
class _Parts:
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class Accumulator:
    """Deltas in, one RequestOutput out: the whole output when fed every delta of a request."""

    def __init__(self) -> None:
        self._head: RequestOutput | None = None
        self._parts: dict[int, _Parts] = {}

    @property
    def empty(self) -> bool:
        return self._head is None

    def add(self, delta: RequestOutput) -> None:
        self._head = delta
        for o in delta.outputs:
            p = self._parts.setdefault(o.index, _Parts())
            if o.text:
                p.texts.append(o.text)
            p.token_ids.extend(o.token_ids)
            if o.logprobs is not None:
                if p.logprobs is None:
                    p.logprobs = []
                p.logprobs.extend(o.logprobs)
            p.cumulative_logprob = o.cumulative_logprob
            p.finish_reason, p.stop_reason = o.finish_reason, o.stop_reason

    def build(self) -> RequestOutput:
        """The merged output; it takes over the accumulator's lists (build once, then drop it)."""
        head = self._head
        outputs = [CompletionOutput(i, "".join(p.texts), p.token_ids, p.cumulative_logprob, p.logprobs,
                                    p.finish_reason, p.stop_reason)
                   for i, p in sorted(self._parts.items())]
        return RequestOutput(head.request_id, head.prompt, head.prompt_token_ids, outputs, head.finished,
                             head.metrics)


class DeltaBuffer:
    """Event loop: one stream's undelivered output. The engine pushes deltas; if the reader has not
    taken the last one yet, the new one merges into it, so the buffer holds at most one output (as
    large as what the reader fell behind by) however slow the reader is."""

    def __init__(self) -> None:
        self._pending: Accumulator | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def push(self, delta: RequestOutput) -> None:
        if self._pending is None:
            self._pending = Accumulator()
        self._pending.add(delta)
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    @property
    def num_pending(self) -> int:
        return 0 if self._pending is None else 1

    async def get(self) -> RequestOutput:
        """The next delta (everything pushed since the last get); raises the error once data ran out."""
        while self._pending is None and self._error is None:
            self._ready.clear()
            await self._ready.wait()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            return pending.build()
        raise self._error
