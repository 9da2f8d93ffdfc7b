"""The README's flag tables, generated from the config dataclasses' flag metadata.

`python -m conserve.flag_docs README.md` rewrites every block between `<!-- flags: Class group -->`
and `<!-- /flags -->`; tests/test_cli.py checks the committed README is current.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from conserve.cluster.config import ClusterConfig
from conserve.config import EngineConfig
from conserve.flags import markdown_table
from conserve.server.config import ServerConfig

CLASSES = {"EngineConfig": EngineConfig, "ServerConfig": ServerConfig, "ClusterConfig": ClusterConfig}
_MARKED = re.compile(r"(<!-- flags: (\S+) (\S+) -->\n)(.*?)(\n<!-- /flags -->)", re.S)


def render_tables(text: str) -> str:
    return _MARKED.sub(lambda m: m.group(1) + markdown_table(CLASSES[m.group(2)], m.group(3)) + m.group(5), text)


def marked_tables(text: str) -> list[str]:
    return [m.group(2) + " " + m.group(3) for m in _MARKED.finditer(text)]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m conserve.flag_docs README.md", file=sys.stderr)
        return 2
    path = Path(argv[0])
    path.write_text(render_tables(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
