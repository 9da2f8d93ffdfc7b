"""Tokenizer: HF `tokenizers` for encode/decode, jinja2 for chat templates.

Two sources: an HF directory (tokenizer.json + configs) or a GGUF file, whose metadata we turn into
an equivalent `tokenizers.Tokenizer` the way llama.cpp would tokenize. No torch here.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from conserve.chat_template import render as render_chat_template
from conserve.errors import ModelLoadError

# --- pre-tokenizer regexes, as llama.cpp applies them per `tokenizer.ggml.pre` ----------------------

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")

# Each name maps to (regexes applied one after another, ignore_merges). llama.cpp splits with each
# regex in turn and keeps unmatched stretches as pieces: a chain of "isolated" Splits does the same.
_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    # llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT, used when the file names no pre-tokenizer.
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
    **{n: ((_GPT2,), False) for n in ("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "exaone4")},
    # Digits one by one, then GPT-2 (SmolLM's tokenizer.json: Digits(individual) + ByteLevel).
    **{
        n: ((r"\p{N}", _GPT2), False)
        for n in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
    },
    # Llama 3 vocabularies look a whole piece up before merging (llama.cpp: ignore_merges).
    **{
        n: ((_LLAMA3,), True)
        for n in ("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")
    },
    **{n: ((_LLAMA3,), False) for n in ("dbrx", "smaug-bpe")},
    **{n: ((_QWEN2,), False) for n in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")},
}

# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6


def _byte_level_pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    regexes, ignore_merges = _PRE_TOKENIZERS[pre]
    steps: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes
    ]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps), ignore_merges


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (used to spell byte-level tokens)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}
_HEX_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# --- GGUF metadata: a small reader for the key/value header only --------------------------------------
# gguf.GGUFReader parses every tensor header and makes a numpy view per array element (~2 s for this
# file); we need only the tokenizer keys, so we walk the header ourselves over a memory map.

_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
               10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


def _read_string(buf: memoryview, off: int) -> tuple[str, int]:
    (n,) = _U64.unpack_from(buf, off)
    off += 8
    return str(buf[off : off + n], "utf-8", "replace"), off + n


def _read_value(buf: memoryview, off: int, vtype: int) -> tuple[Any, int]:
    if vtype == _STRING:
        return _read_string(buf, off)
    if vtype in _SCALAR_FMT:
        fmt = struct.Struct(_SCALAR_FMT[vtype])
        return fmt.unpack_from(buf, off)[0], off + fmt.size
    if vtype != _ARRAY:
        raise ValueError(f"unknown GGUF value type {vtype}")
    (itype,) = _U32.unpack_from(buf, off)
    (count,) = _U64.unpack_from(buf, off + 4)
    off += 12
    if itype in _SCALAR_FMT:  # one vectorised read (and a copy: the map is closed afterwards)
        dtype = np.dtype(_SCALAR_FMT[itype])
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=off).copy()
        return arr, off + dtype.itemsize * count
    items: list[Any] = []
    append = items.append
    if itype == _STRING:  # strings have their own lengths: a tight loop is the fast path
        unpack = _U64.unpack_from
        for _ in range(count):
            (n,) = unpack(buf, off)
            off += 8
            append(str(buf[off : off + n], "utf-8", "replace"))
            off += n
        return items, off
    for _ in range(count):
        value, off = _read_value(buf, off, itype)
        append(value)
    return items, off


def _parse_gguf_metadata(buf: memoryview, name: str) -> dict[str, Any]:
    if bytes(buf[:4]) != b"GGUF":
        raise ModelLoadError(f"{name}: not a GGUF file (bad magic bytes)")
    (version,) = _U32.unpack_from(buf, 4)
    if version not in (2, 3):
        raise ModelLoadError(f"{name}: unsupported GGUF version {version} (need 2 or 3, little-endian)")
    (n_kv,) = _U64.unpack_from(buf, 16)
    off, meta = 24, {}
    try:
        for _ in range(n_kv):
            key, off = _read_string(buf, off)
            (vtype,) = _U32.unpack_from(buf, off)
            meta[key], off = _read_value(buf, off + 4, vtype)
    except (struct.error, ValueError, IndexError) as e:
        raise ModelLoadError(f"{name}: corrupt GGUF metadata ({e})") from e
    return meta


def read_gguf_metadata(source: Any) -> tuple[dict[str, Any], str]:
    """Metadata of a GGUF file given as a path or an open `gguf.GGUFReader`; returns (metadata, name)."""
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        try:
            with open(name, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    return _parse_gguf_metadata(view, name), name
                finally:
                    view.release()
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{name}: cannot read GGUF file ({e})") from e
    data = getattr(source, "data", None)  # GGUFReader keeps the whole file as a numpy memmap
    if not isinstance(data, np.ndarray):
        raise TypeError(f"expected a path or a gguf.GGUFReader, got {type(source).__name__}")
    name = str(getattr(data, "filename", None) or "<gguf>")
    return _parse_gguf_metadata(memoryview(np.ascontiguousarray(data).view(np.uint8)), name), name


# --- chat templates ------------------------------------------------------------------------------------


def _normalize_templates(value: Any) -> dict[str, str]:
    """tokenizer_config's chat_template is a string or a list of {name, template}."""
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {str(t["name"]): str(t["template"]) for t in value if isinstance(t, Mapping)}
    return {}


_LONG_TEXT = 4096  # characters from which encode releases the GIL (see Tokenizer.encode)


# --- the tokenizer -------------------------------------------------------------------------------------


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token ids and chat templates of one model."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None,
                 eos_token_ids: Sequence[int], pad_token_id: int | None = None,
                 chat_templates: Mapping[str, str] | None = None, vocab_size: int | None = None,
                 source: str = "") -> None:
        self.backend = backend
        self.source = source
        self._bos = bos_token_id
        self._eos = list(dict.fromkeys(int(i) for i in eos_token_ids))  # dedupe, keep order
        self._pad = pad_token_id
        self._templates = dict(chat_templates or {})
        self._vocab_size = vocab_size if vocab_size is not None else backend.get_vocab_size(True)
        added = backend.get_added_tokens_decoder()
        self._added = set(added)
        self._special = {i for i, t in added.items() if t.special}
        self._special.update(i for i in (bos_token_id, *self._eos) if i is not None)
        self._byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        self._token_bytes: dict[int, bytes] = {}
        first = backend.encode("", add_special_tokens=True).ids
        self.add_bos_token = bool(first) and first[0] == bos_token_id

    # -- loading

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        folder = Path(path)
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise ModelLoadError(f"{tj}: file not found (an HF tokenizer directory needs tokenizer.json)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise ModelLoadError(f"{tj}: cannot parse tokenizer.json ({e})") from e
        cfg = _read_json(folder / "tokenizer_config.json")
        gen = _read_json(folder / "generation_config.json")

        def token_id(key: str) -> int | None:
            tok = cfg.get(key)
            if isinstance(tok, Mapping):
                tok = tok.get("content")
            return backend.token_to_id(tok) if isinstance(tok, str) else None

        bos = token_id("bos_token")
        if bos is None and isinstance(gen.get("bos_token_id"), int):
            bos = gen["bos_token_id"]
        eos_ids = [i for i in [token_id("eos_token")] if i is not None]
        gen_eos = gen.get("eos_token_id")
        eos_ids += [gen_eos] if isinstance(gen_eos, int) else [i for i in gen_eos or [] if isinstance(i, int)]
        pad = token_id("pad_token")
        if pad is None and isinstance(gen.get("pad_token_id"), int):
            pad = gen["pad_token_id"]
        _apply_add_special_config(backend, cfg, bos, eos_ids[0] if eos_ids else None)

        templates = _normalize_templates(cfg.get("chat_template"))
        jinja_file = folder / "chat_template.jinja"  # newer transformers save templates as files
        if not templates and jinja_file.is_file():
            templates = {"default": jinja_file.read_text(encoding="utf-8")}
        for named in sorted((folder / "additional_chat_templates").glob("*.jinja")):
            templates.setdefault(named.stem, named.read_text(encoding="utf-8"))
        return cls(backend, bos_token_id=bos, eos_token_ids=eos_ids, pad_token_id=pad,
                   chat_templates=templates, source=str(folder))

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """One token per byte (ids 0-255), then <|bos|> (256) and <|eos|> (257), with a plain chat
        template: for models that come without a tokenizer (dummy weights); any vocabulary of at least
        258 ids runs it."""
        table = _bytes_to_unicode()
        backend = tokenizers.Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken("<|bos|>", special=True), AddedToken("<|eos|>", special=True)])
        backend.post_processor = _specials_processor(("<|bos|>", 256), None)
        template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant: {% endif %}")
        return cls(backend, bos_token_id=256, eos_token_ids=[257], chat_templates={"default": template},
                   source="byte-level")

    @classmethod
    def from_gguf(cls, source: Any) -> Tokenizer:
        """Build from a GGUF file's `tokenizer.*` metadata; `source` is a path or a gguf.GGUFReader."""
        meta, name = read_gguf_metadata(source)
        return cls.from_gguf_metadata(meta, name)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], name: str = "<gguf>") -> Tokenizer:
        def need(key: str) -> Any:
            if key not in meta:
                raise ModelLoadError(f"{name}: GGUF metadata has no {key!r}")
            return meta[key]

        kind = need("tokenizer.ggml.model")
        tokens: list[str] = need("tokenizer.ggml.tokens")
        n = len(tokens)
        types = np.asarray(meta.get("tokenizer.ggml.token_type", np.full(n, _NORMAL)), dtype=np.int64)

        def opt_id(key: str) -> int | None:
            v = meta.get(key)
            return int(v) if v is not None and 0 <= int(v) < n else None

        bos, eos = opt_id("tokenizer.ggml.bos_token_id"), opt_id("tokenizer.ggml.eos_token_id")
        unk = opt_id("tokenizer.ggml.unknown_token_id")
        if kind == "gpt2":
            backend = _byte_level_backend(meta, tokens, name)
            add_bos_default = _PRE_TOKENIZERS.get(str(meta.get("tokenizer.ggml.pre", "default")),
                                                  ((), False))[1]  # llama.cpp: llama3 family adds BOS
        elif kind == "llama":
            backend = _sentencepiece_backend(meta, tokens, types, unk, name)
            add_bos_default = True
        else:
            raise ModelLoadError(
                f"{name}: unsupported tokenizer.ggml.model {kind!r} (supported: 'gpt2', 'llama')")

        # Control tokens match whole and are special; user-defined ones match whole but stay text.
        # Every token string is already in the model vocab, so these keep their GGUF ids.
        ctrl: list[int] = np.nonzero(types == _CONTROL)[0].tolist()
        ctrl += [i for i in (bos, eos, unk) if i is not None and i not in ctrl]
        backend.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True) for i in ctrl])
        user = np.nonzero(types == _USER_DEFINED)[0].tolist()
        backend.add_tokens([AddedToken(tokens[i], normalized=False, special=False) for i in user])

        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
        backend.post_processor = _specials_processor(
            (tokens[bos], bos) if add_bos and bos is not None else None,
            (tokens[eos], eos) if add_eos and eos is not None else None)

        # End-of-generation ids: eos plus end-of-turn / end-of-message when the file names them.
        eos_ids = [i for i in (eos, opt_id("tokenizer.ggml.eot_token_id"),
                               opt_id("tokenizer.ggml.eom_token_id")) if i is not None]
        templates: dict[str, str] = {}
        if isinstance(meta.get("tokenizer.chat_template"), str):
            templates["default"] = meta["tokenizer.chat_template"]
        for tname in meta.get("tokenizer.chat_templates", []) or []:  # llama.cpp's named templates
            body = meta.get(f"tokenizer.chat_template.{tname}")
            if isinstance(body, str):
                templates[str(tname)] = body
        return cls(backend, bos_token_id=bos, eos_token_ids=eos_ids,
                   pad_token_id=opt_id("tokenizer.ggml.padding_token_id"), chat_templates=templates,
                   vocab_size=n, source=name)

    # -- special tokens

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    @property
    def eos_token_id(self) -> int | None:
        return self._eos[0] if self._eos else None

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos)

    @property
    def pad_token_id(self) -> int | None:
        return self._pad

    @property
    def bos_token(self) -> str | None:
        return self.backend.id_to_token(self._bos) if self._bos is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.backend.id_to_token(self._eos[0]) if self._eos else None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    # -- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) >= _LONG_TEXT:
            # `encode_batch` lets go of the GIL while it works and `encode` does not (measured: a
            # 500k-character prompt held the GIL for 275 ms), so other threads -- the server's event
            # loop above all -- keep running while a long prompt is encoded on a worker thread.
            return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (logprobs' `bytes`); a lone token may be part of a character."""
        cached = self._token_bytes.get(token_id)
        if cached is not None:
            return cached
        piece = self.backend.id_to_token(token_id) or ""
        if token_id in self._special or token_id in self._added:
            out = piece.encode("utf-8")
        elif self._byte_level and all(c in _BYTE_DECODER for c in piece):
            out = bytes(_BYTE_DECODER[c] for c in piece)
        elif m := _HEX_BYTE.fullmatch(piece):  # SentencePiece byte fallback piece
            out = bytes([int(m.group(1), 16)])
        else:
            out = piece.replace("\u2581", " ").encode("utf-8")
        self._token_bytes[token_id] = out
        return out

    def token_text(self, token_id: int) -> str:
        """One token's text (U+FFFD where it holds only part of a UTF-8 character)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    # -- chat

    @property
    def chat_template(self) -> str | None:
        return self._templates.get("default")

    @property
    def chat_templates(self) -> dict[str, str]:
        return dict(self._templates)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None,
                            chat_template: str | None = None, **extra: Any) -> str:
        source = self._select_template(chat_template, tools)
        return render_chat_template(source, self.chat_template_context(messages, add_generation_prompt, tools,
                                                                       **extra))

    def chat_template_context(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                              tools: Sequence[Mapping[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
        """The variables a chat template sees (for rendering a template elsewhere, e.g. in a sandbox)."""
        return {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "", **extra,
                "messages": messages, "tools": tools, "add_generation_prompt": add_generation_prompt}

    def _select_template(self, chat_template: str | None, tools: Any) -> str:
        if chat_template is not None:
            return self._templates.get(chat_template, chat_template)  # a name, or the template itself
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        raise ValueError(f"the tokenizer of {self.source or 'this model'} has no chat template; "
                         "pass chat_template= or use a completion endpoint")


# --- backends ------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot parse JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def _specials_processor(bos: tuple[str, int] | None,
                        eos: tuple[str, int] | None) -> processors.PostProcessor | None:
    if bos is None and eos is None:
        return None
    single = ([bos[0]] if bos else []) + ["$A"] + ([eos[0]] if eos else [])
    return processors.TemplateProcessing(single=" ".join(single),
                                         special_tokens=[t for t in (bos, eos) if t is not None])


def _apply_add_special_config(backend: tokenizers.Tokenizer, cfg: Mapping[str, Any],
                              bos: int | None, eos: int | None) -> None:
    """tokenizer_config's explicit add_bos_token / add_eos_token win over tokenizer.json's post-processor
    (as in transformers); without them the post-processor decides."""
    want_bos, want_eos = cfg.get("add_bos_token"), cfg.get("add_eos_token")
    if want_bos is None and want_eos is None:
        return
    added = backend.encode("", add_special_tokens=True).ids
    has_bos = bos is not None and added[:1] == [bos]
    has_eos = eos is not None and added[-1:] == [eos]
    need_bos = has_bos if want_bos is None else bool(want_bos) and bos is not None
    need_eos = has_eos if want_eos is None else bool(want_eos) and eos is not None
    if (need_bos, need_eos) != (has_bos, has_eos) or len(added) != has_bos + has_eos:
        name = backend.id_to_token
        backend.post_processor = _specials_processor(
            (name(bos), bos) if need_bos and bos is not None else None,
            (name(eos), eos) if need_eos and eos is not None else None)


def _byte_level_backend(meta: Mapping[str, Any], tokens: list[str], name: str) -> tokenizers.Tokenizer:
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre not in _PRE_TOKENIZERS:
        raise ModelLoadError(f"{name}: unsupported tokenizer.ggml.pre {pre!r} "
                             f"(supported: {', '.join(sorted(_PRE_TOKENIZERS))})")
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise ModelLoadError(f"{name}: byte-level BPE tokenizer without tokenizer.ggml.merges")
    pre_tok, ignore_merges = _byte_level_pre_tokenizer(pre)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tok
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(meta: Mapping[str, Any], tokens: list[str], types: np.ndarray,
                           unk: int | None, name: str) -> tokenizers.Tokenizer:
    """SentencePiece BPE as llama.cpp runs it: spaces become '▁', an optional '▁' prefix, merges by the
    score of the merged piece, bytes for anything not in the vocab."""
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ModelLoadError(f"{name}: SentencePiece ('llama') tokenizer needs tokenizer.ggml.scores")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=_merges_from_scores(tokens, np.asarray(scores, dtype=np.float64), types),
        unk_token=tokens[unk] if unk is not None else None, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # Prepend works per text stretch between special tokens, as llama.cpp adds the prefix after each.
    backend.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("\u2581")] if prefix else []) + [normalizers.Replace(" ", "\u2581")])
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend


def _merges_from_scores(tokens: list[str], scores: np.ndarray, types: np.ndarray) -> list[tuple[str, str]]:
    """Every split of a normal piece into two vocab pieces is a merge, ranked by the piece's score: that
    is SentencePiece's rule (merge the adjacent pair whose union scores highest)."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    found: list[tuple[float, int, int, str, str]] = []
    mergeable = (types == _NORMAL) | (types == _USER_DEFINED)
    for i in np.nonzero(mergeable)[0].tolist():
        piece = tokens[i]
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            li = vocab.get(left)
            if li is not None and right in vocab:
                found.append((-float(scores[i]), i, li, left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]
