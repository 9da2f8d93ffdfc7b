"""IncrementalDetokenizer: UTF-8 safe streaming deltas and stop strings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conserve.detokenizer import IncrementalDetokenizer
from conserve.tokenizer import Tokenizer

PROMPT = "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok(gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    deltas = []
    for i in range(0, len(ids), chunk):
        deltas.append(detok.step(ids[i : i + chunk]))
        if detok.stopped:
            break
    return deltas


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_multibyte_text_never_yields_broken_characters(tok: Tokenizer, chunk: int) -> None:
    text = ("吾輩は猫である。名前はまだ無い。中文测试\uff0c한국어 텍스트 🎉👍🏽🇯🇵 done. "
            "Café naïve — “quotes” … 12345")
    ids = tok.encode(text, add_special_tokens=False)
    # The test needs tokens that hold only part of a character, or it would prove nothing.
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT))
    deltas = stream(detok, ids, chunk)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == tok.decode(ids) == text
    assert detok.text == text and not detok.stopped and detok.stop_reason is None


def test_random_token_streams_concatenate_to_full_decode(tok: Tokenizer) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(17, tok.vocab_size, size=40).tolist()  # anything, even invalid byte runs
        detok = IncrementalDetokenizer(tok, [])
        out = "".join(stream(detok, ids)) + detok.flush()
        assert out == tok.decode(ids)


def test_special_tokens_skipped_or_kept(tok: Tokenizer) -> None:
    ids = tok.encode("Hi<|im_end|>", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert "".join(stream(detok, ids)) + detok.flush() == "Hi"
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert "".join(stream(detok, ids)) + detok.flush() == "Hi<|im_end|>"


def test_stop_string_across_token_boundaries(tok: Tokenizer) -> None:
    ids = tok.encode("The answer is 42. Thank you for asking!", add_special_tokens=False)
    stop = "2. Tha"  # spans the tokens "2", ".", " Thank"
    detok = IncrementalDetokenizer(tok, [], stop=["never", stop])
    deltas = stream(detok, ids)
    assert detok.stopped and detok.stop_reason == stop
    assert "".join(deltas) == detok.text == "The answer is 4"
    assert len(deltas) < len(ids)  # stopped early: the rest was never decoded
    assert detok.step(tok.encode(" more")) == "" and detok.flush() == ""


def test_include_stop_str_in_output(tok: Tokenizer) -> None:
    ids = tok.encode("one two three four", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["thr"], include_stop_str_in_output=True)
    assert "".join(stream(detok, ids)) == detok.text == "one two thr"
    assert detok.stop_reason == "thr"


def test_earliest_of_several_stops_wins(tok: Tokenizer) -> None:
    ids = tok.encode("alpha beta gamma", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["gamma", "beta"])
    assert "".join(stream(detok, ids, chunk=len(ids))) == "alpha "
    assert detok.stop_reason == "beta"


def test_possible_stop_prefix_is_held_then_released(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=["STOP!"])
    first = detok.step(tok.encode("Hello ST", add_special_tokens=False))
    assert first == "Hello "  # "ST" could begin "STOP!"
    second = detok.step(tok.encode("OR", add_special_tokens=False))
    assert second == "STOR"  # "STOR" cannot: released at once
    assert detok.step(tok.encode(" ST", add_special_tokens=False)) == " "
    assert detok.flush() == "ST"  # finished for another reason: hand out what was held
    assert detok.text == "Hello STOR ST" and not detok.stopped


def test_stop_string_at_the_very_start(tok: Tokenizer) -> None:
    ids = tok.encode("User: hi", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT), stop=["User:"])
    deltas = stream(detok, ids)
    assert all(d == "" for d in deltas)
    assert detok.stopped and detok.text == "" and detok.stop_reason == "User:"


def test_prompt_context_keeps_leading_space(tok: Tokenizer) -> None:
    prompt = tok.encode("Hello", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    assert detok.step(tok.encode(" world", add_special_tokens=False)) == " world"
    assert detok.token_text(tok.encode(" world", add_special_tokens=False)[0]) == " world"


def test_sentencepiece_spacing_uses_prompt_context() -> None:
    """A SentencePiece decoder drops the leading space of a decode; the window keeps it."""
    pieces = ["▁", "h", "i", "▁hi", "▁the", "t", "e", "he", "▁t", "▁th"]
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    tok = Tokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.array([0.0] * 259 + [-float(i) for i in range(len(pieces))], np.float32),
        "tokenizer.ggml.token_type": np.array([2, 3, 3] + [6] * 256 + [1] * len(pieces), np.int32),
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    })
    prompt = tok.encode("hi")
    out_ids = tok.encode("the hi é", add_special_tokens=False)  # é goes through byte fallback
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = stream(detok, out_ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == " the hi é"
