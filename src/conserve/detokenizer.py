"""Incremental detokenization with stop strings, for streaming one request's output.

Each step decodes only a short window of tokens (the prefix/read offsets idea): the text of
ids[prefix:read] was already emitted, so decode(ids[prefix:]) minus that text is what the new tokens
add. Decoding a window rather than the new tokens alone keeps context-dependent decoders right
(SentencePiece drops a leading space at the start of a decode). Cost per step: a few tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from conserve.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5  # prompt tokens decoded ahead of the output, for the first tokens' spacing


class IncrementalDetokenizer:
    """Turns the tokens of one request into final text deltas.

    `step()` returns only text that will not change: a trailing U+FFFD (an incomplete UTF-8 character)
    waits for the bytes that complete it, and text that could be the start of a stop string waits until
    it cannot be. `flush()` releases what is held once the request ends for another reason.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True, stop: Sequence[str] | None = None,
                 include_stop_str_in_output: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stops = [s for s in (stop or []) if s]
        self._include_stop = include_stop_str_in_output
        ids = list(prompt_token_ids[max(0, len(prompt_token_ids) - _PROMPT_CONTEXT) :])
        if self._decode(ids).endswith(_REPLACEMENT):
            ids = []  # the prompt ends inside a character: its context would only confuse offsets
        self._ids = ids
        self._prefix = 0  # ids[prefix:read] decode to _prefix_text, already accounted for
        self._read = len(ids)
        self._prefix_text = self._decode(ids)
        self._window_emitted = 0  # chars of the current window already made stable
        self._out: list[str] = []  # released text chunks
        self._pending = ""  # stable text not yet released: a possible stop-string start
        self.num_output_tokens = 0
        self.stopped = False
        self.stop_reason: str | None = None

    @property
    def text(self) -> str:
        """The output text handed out so far (after a stop: the final, cut text)."""
        if len(self._out) > 1:  # engines read this every step: keep it one string
            self._out = ["".join(self._out)]
        return self._out[0] if self._out else ""

    def token_text(self, token_id: int) -> str:
        """One token's own text, for logprobs (cached by the tokenizer)."""
        return self._tok.token_text(token_id)

    def step(self, new_token_ids: Sequence[int]) -> str:
        """Add tokens; return the new final text (may be empty)."""
        if self.stopped or not new_token_ids:
            return ""
        self._ids.extend(new_token_ids)
        self.num_output_tokens += len(new_token_ids)
        window = self._decode(self._ids[self._prefix :])[len(self._prefix_text) :]
        stable = len(window) - _trailing_replacements(window)
        if stable > self._window_emitted:
            self._pending += window[self._window_emitted : stable]
        if stable == len(window):  # all complete: slide the window forward
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
            self._window_emitted = 0
        else:
            self._window_emitted = max(self._window_emitted, stable)
        return self._release(final=False)

    def flush(self) -> str:
        """The request ended (length, EOS, abort): release everything held back."""
        if self.stopped:
            return ""
        window = self._decode(self._ids[self._prefix :])[len(self._prefix_text) :]
        self._pending += window[self._window_emitted :]  # an unfinished character stays U+FFFD
        self._prefix = self._read = len(self._ids)
        self._prefix_text, self._window_emitted = "", 0
        return self._release(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def _release(self, final: bool) -> str:
        """Cut at the first stop string; otherwise release all but a possible stop-string start.

        Released text never holds the start of a stop string (that part was kept pending), so a
        match can only begin inside the pending text and searching it alone is enough.
        """
        text, keep = self._pending, 0
        if self._stops:
            hit = _first_stop(text, self._stops)
            if hit is not None:
                pos, stop = hit
                text = text[: pos + len(stop) if self._include_stop else pos]
                self.stopped, self.stop_reason = True, stop
            elif not final:
                keep = _stop_prefix_len(text, self._stops)
        out = text[: len(text) - keep]
        self._pending = text[len(text) - keep :] if keep else ""
        if out:
            self._out.append(out)
        return out


def _trailing_replacements(text: str) -> int:
    n = 0
    while n < len(text) and text[-1 - n] == _REPLACEMENT:
        n += 1
    return n


def _first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest
