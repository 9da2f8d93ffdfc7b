"""Validate response bodies against OpenAI's official component schemas (tests/data/openai_schemas.json,
extracted from github.com/openai/openai-openapi by scripts/extract_openai_schemas.py).

The spec is OpenAPI 3.1 but still marks some fields with 3.0's `nullable: true`; that keyword is
translated to "this schema, or null" before validating with JSON Schema 2020-12. Nothing else is relaxed,
except the one documented gap below.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import jsonschema_rs

DATA = Path(__file__).parent / "data" / "openai_schemas.json"


def _translate_nullable(schema):
    if isinstance(schema, list):
        return [_translate_nullable(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "nullable":
            continue
        # enum/const/default/required hold data, not subschemas; properties' keys are names, values schemas.
        out[key] = value if key in ("enum", "const", "default", "required") else _translate_nullable(value)
    if schema.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def _document() -> dict:
    return json.loads(DATA.read_text())


def _completion_chunk_schema(schemas: dict) -> dict:
    """OpenAI's spec has no schema of its own for streamed completions: they are CreateCompletionResponse
    objects whose `finish_reason` is null until a choice's last chunk (required there, so it cannot be
    left out). Only that field is widened."""
    chunk = copy.deepcopy(schemas["CreateCompletionResponse"])
    chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]["nullable"] = True
    return chunk


@functools.cache
def validator(name: str):
    doc = _document()
    schemas = dict(doc["components"]["schemas"])
    schemas["CompletionChunk"] = _completion_chunk_schema(schemas)
    root = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$ref": f"#/components/schemas/{name}",
            "components": {"schemas": _translate_nullable(schemas)}}
    return jsonschema_rs.Draft202012Validator(root)


def errors(name: str, instance) -> list[str]:
    """Every way `instance` breaks component schema `name` ('CompletionChunk': a streamed completion)."""
    return [f"{'/'.join(map(str, e.instance_path)) or '<root>'}: {e.message}"
            for e in validator(name).iter_errors(instance)]


def assert_valid(name: str, instance) -> None:
    found = errors(name, instance)
    assert not found, f"not a valid OpenAI {name}:\n" + "\n".join(found) + f"\n{json.dumps(instance)[:2000]}"


def source() -> dict:
    return _document()["source"]
