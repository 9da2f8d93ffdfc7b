"""Rendering chat templates: a sandboxed jinja2 environment with the helpers HF templates expect.

Kept free of heavy imports (jinja2 only): the request-template sandbox process imports this module alone.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML and non-ASCII; chat templates want the plain JSON text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render(source: str, context: Mapping[str, Any]) -> str:
    """Render `source` with `context`; every template failure comes out as a ValueError."""
    try:
        return compile_template(source).render(**context)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template error: {e.message or e}") from e
    except (TypeError, KeyError, IndexError, AttributeError) as e:  # bad message shapes
        raise ValueError(f"chat template error: {type(e).__name__}: {e}") from e
    except (OverflowError, RecursionError) as e:  # the sandbox's range limit, runaway macros
        raise ValueError(f"chat template error: {type(e).__name__}: {e}") from e
