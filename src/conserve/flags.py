"""Command-line flags generated from config dataclasses, so each default and help text is written once.

A field declared with `flag(...)` becomes `--field-name` (underscores to dashes), in the argparse
group its metadata names; fields without it are internal and get no flag. The README's flag tables
are generated from the same metadata (flag_docs.py), and a test checks they are current.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, ClassVar


def flag(default: Any = dataclasses.MISSING, help: str = "", *, group: str = "engine", default_factory=None,
         shown_default: str | None = None, **argparse_kwargs) -> Any:
    """A dataclass field that is also a command-line flag. argparse_kwargs: type, choices, metavar,
    action. shown_default: how the default reads in help and docs when its value would mislead."""
    metadata = {"help": help, "group": group, "shown_default": shown_default, "argparse": argparse_kwargs}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def option_name(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def shown_default(f: dataclasses.Field) -> str:
    if f.metadata["shown_default"] is not None:
        return f.metadata["shown_default"]
    value = _default(f)
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "off" if not value else "on"
    return f"`{value}`" if isinstance(value, str) else str(value)


def add_flags(parser: argparse.ArgumentParser, cls, titles: dict[str, str] | None = None) -> None:
    """Add one flag per flag field of cls, in argparse groups named by the fields' `group`."""
    groups: dict[str, Any] = {}
    for f in flag_fields(cls):
        name = f.metadata["group"]
        if name not in groups:
            groups[name] = parser.add_argument_group((titles or {}).get(name, name))
        kwargs = dict(f.metadata["argparse"])
        default = _default(f)
        if isinstance(default, bool):
            kwargs.setdefault("action", argparse.BooleanOptionalAction)
        elif "type" not in kwargs and default is not None and "action" not in kwargs:
            kwargs["type"] = type(default)
        help_text = f.metadata["help"].replace("%", "%%")
        if default is not None or f.metadata["shown_default"] is not None:
            help_text += f" (default: {shown_default(f).strip('`')})"
        groups[name].add_argument(option_name(f), dest=f.name, default=default, help=help_text, **kwargs)


def from_flags(cls, args: argparse.Namespace, **overrides):
    """Build cls from parsed flags (fields without a flag keep their defaults unless overridden)."""
    values = {f.name: getattr(args, f.name) for f in flag_fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def markdown_table(cls, group: str) -> str:
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for f in flag_fields(cls):
        if f.metadata["group"] == group:
            metavar = f.metadata["argparse"].get("metavar")
            name = option_name(f) + (f" {metavar}" if metavar else "")
            rows.append(f"| `{name}` | {shown_default(f)} | {f.metadata['help']} |")
    return "\n".join(rows)


class Flagged:
    """Base of the config dataclasses whose fields are flags: `add_flags(parser)` and `from_flags(args)`.
    FLAG_GROUPS titles the argparse groups (by the fields' `group`)."""

    FLAG_GROUPS: ClassVar[dict[str, str] | None] = None

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        add_flags(parser, cls, cls.FLAG_GROUPS)

    @classmethod
    def from_flags(cls, args: argparse.Namespace, **overrides):
        """The config from parsed flags (fields without a flag keep their defaults unless overridden)."""
        return from_flags(cls, args, **overrides)
