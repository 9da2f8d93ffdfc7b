"""Streamed deltas: the engine thread's tracker, the per-stream coalescing buffer, the accumulator."""

from __future__ import annotations

import asyncio

import pytest

from conserve.deltas import Accumulator, DeltaBuffer, DeltaTracker
from conserve.outputs import CompletionOutput, RequestOutput, TokenLogprobs


def cumulative(n_tokens: int, finished: bool = False, logprobs: bool = True) -> RequestOutput:
    """What Engine.step returns after n_tokens tokens: everything so far (token i is 'w{i} ')."""
    text = "".join(f"w{i} " for i in range(n_tokens))
    lps = [TokenLogprobs(i, -0.5 * i, []) for i in range(n_tokens)] if logprobs else None
    out = CompletionOutput(0, text, list(range(n_tokens)), -float(n_tokens), lps,
                           "length" if finished else None)
    return RequestOutput("r", None, [7, 8], [out], finished)


def test_tracker_hands_over_only_what_is_new():
    tracker = DeltaTracker()
    first = tracker.delta(cumulative(2))
    assert first.outputs[0].text == "w0 w1 " and first.outputs[0].token_ids == [0, 1]
    second = tracker.delta(cumulative(3))
    o = second.outputs[0]
    assert (o.text, o.token_ids, [lp.token_id for lp in o.logprobs]) == ("w2 ", [2], [2])
    assert tracker.delta(cumulative(3)).outputs == []  # nothing new: no completion in the delta
    last = tracker.delta(cumulative(3, finished=True))
    assert last.finished and last.outputs[0].finish_reason == "length" and last.outputs[0].token_ids == []
    assert tracker._sent == {}  # a finished request leaves no state behind


def test_tracker_text_held_back_then_released():
    """The detokenizer may hold text back (a partial character): tokens and text advance separately."""
    tracker = DeltaTracker()
    held = RequestOutput("r", None, [1], [CompletionOutput(0, "", [5], None, None)], False)
    assert tracker.delta(held).outputs[0].token_ids == [5]
    released = RequestOutput("r", None, [1], [CompletionOutput(0, "é", [5, 6], None, None)], False)
    o = tracker.delta(released).outputs[0]
    assert (o.text, o.token_ids) == ("é", [6])


def test_buffer_coalesces_a_slow_readers_deltas_into_one():
    async def run():
        tracker, buf = DeltaTracker(), DeltaBuffer()
        for n in range(1, 51):  # 50 steps while the reader is away
            buf.push(tracker.delta(cumulative(n)))
            assert buf.num_pending == 1
        merged = await buf.get()
        assert buf.num_pending == 0
        want = cumulative(50)
        o = merged.outputs[0]
        assert o.text == want.outputs[0].text and o.token_ids == want.outputs[0].token_ids
        assert [lp.token_id for lp in o.logprobs] == list(range(50))
        assert o.cumulative_logprob == -50.0 and not merged.finished
        buf.push(tracker.delta(cumulative(52, finished=True)))
        tail = await buf.get()
        assert tail.finished and tail.outputs[0].token_ids == [50, 51]

    asyncio.run(run())


def test_buffer_memory_stays_linear_in_the_output():
    """Many steps pushed to a reader that never reads: what the buffer holds equals the output once,
    where a queue of cumulative copies would hold n(n+1)/2 tokens."""
    tracker, buf, n = DeltaTracker(), DeltaBuffer(), 500
    for k in range(1, n + 1):
        buf.push(tracker.delta(cumulative(k, logprobs=False)))
    parts = buf._pending._parts[0]
    assert len(parts.token_ids) == n and sum(len(t) for t in parts.texts) == len(cumulative(n).outputs[0].text)


def test_buffer_delivers_pending_data_before_the_error():
    async def run():
        buf = DeltaBuffer()
        buf.push(DeltaTracker().delta(cumulative(1)))
        buf.fail(RuntimeError("engine gone"))
        assert (await buf.get()).outputs[0].token_ids == [0]
        with pytest.raises(RuntimeError, match="engine gone"):
            await buf.get()

    asyncio.run(run())


def test_buffer_wakes_a_waiting_reader():
    async def run():
        buf = DeltaBuffer()
        reader = asyncio.ensure_future(buf.get())
        await asyncio.sleep(0)
        assert not reader.done()
        buf.push(DeltaTracker().delta(cumulative(1)))
        assert (await reader).outputs[0].text == "w0 "

    asyncio.run(run())


def test_accumulator_rebuilds_the_whole_output_with_several_choices():
    tracker, acc = DeltaTracker(), Accumulator()
    for n in range(1, 6):
        a = CompletionOutput(0, "a" * n, list(range(n)), None, None, "stop" if n == 3 else None)
        b = CompletionOutput(1, "b" * n, list(range(n)), None, None, "length" if n == 5 else None)
        outs = [a if n <= 3 else CompletionOutput(0, "aaa", [0, 1, 2], None, None, "stop"), b]
        acc.add(tracker.delta(RequestOutput("r", "p", [1], outs, n == 5)))
    whole = acc.build()
    assert [(o.index, o.text, o.finish_reason) for o in whole.outputs] == [(0, "aaa", "stop"), (1, "bbbbb", "length")]
    assert whole.finished and whole.prompt == "p"
