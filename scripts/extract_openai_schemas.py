"""Extract the OpenAI response schemas the tests validate against from OpenAI's official OpenAPI spec.

    python scripts/extract_openai_schemas.py path/to/openapi.yaml --commit SHA

The spec lives in github.com/openai/openai-openapi (MIT licence). Only the named component schemas and
everything they reference are kept, stripped of prose (descriptions, examples, titles), and written to
tests/data/openai_schemas.json with the source recorded, so the tests need neither the network nor the
whole 3 MB spec. `$ref`s keep their '#/components/schemas/...' form: the output's `components` object
resolves them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

ROOTS = ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse",
         "ErrorResponse", "Model", "ListModelsResponse", "OpenAIFile", "ListFilesResponse", "DeleteFileResponse",
         "Batch", "ListBatchesResponse")
_REF_PREFIX = "#/components/schemas/"
_PROSE = {"description", "example", "examples", "title", "x-oaiMeta", "x-oaiExpandable"}
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}


def strip_prose(schema):
    """The schema without documentation keywords; property names (keys of `properties`) are kept as they are."""
    if isinstance(schema, list):
        return [strip_prose(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _PROSE:
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: strip_prose(sub) for name, sub in value.items()}
        elif key in ("enum", "const", "default", "required"):
            out[key] = value
        else:
            out[key] = strip_prose(value)
    return out


def refs(schema) -> set[str]:
    if isinstance(schema, list):
        return set().union(*(refs(s) for s in schema)) if schema else set()
    if not isinstance(schema, dict):
        return set()
    found = set()
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str):
            if not value.startswith(_REF_PREFIX):
                raise ValueError(f"unexpected $ref {value!r}")
            found.add(value[len(_REF_PREFIX):])
        elif key not in ("enum", "const", "default", "example", "examples"):
            found |= refs(value)
    return found


def closure(all_schemas: dict, roots) -> dict:
    keep, todo = {}, list(roots)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep[name] = strip_prose(all_schemas[name])
        todo.extend(refs(keep[name]) - keep.keys())
    return dict(sorted(keep.items()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec", help="openapi.yaml from github.com/openai/openai-openapi")
    p.add_argument("--commit", required=True, help="the openai-openapi commit the spec was read from")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests/data/openai_schemas.json"))
    args = p.parse_args()
    spec = yaml.safe_load(Path(args.spec).read_text())
    doc = {
        "source": {"repository": "https://github.com/openai/openai-openapi", "path": "openapi.yaml",
                   "commit": args.commit, "openapi": spec["openapi"], "spec_version": spec["info"]["version"],
                   "license": "MIT", "copyright": "Copyright (c) OpenAI (https://openai.com)",
                   "note": "component schemas extracted by scripts/extract_openai_schemas.py, prose removed"},
        "roots": list(ROOTS),
        "components": {"schemas": closure(spec["components"]["schemas"], ROOTS)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    print(f"wrote {len(doc['components']['schemas'])} schemas to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
