"""A one-line progress bar on stderr, redrawn in place at most 10 times a second (every 2 s when stderr
is a file or pipe, so logs stay short)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30


class Progress:
    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self._last_draw = 0.0
        self._shown = False
        self._width = 0
        isatty = getattr(self.stream, "isatty", lambda: False)
        self._interval = 0.1 if isatty() else 2.0

    def update(self, done: int, failed: int, offline_done: int | None = None, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self._interval:
            return
        self._last_draw = now
        filled = WIDTH * done // max(self.total, 1)
        line = f"\r[{'#' * filled}{'.' * (WIDTH - filled)}] {done}/{self.total} online"
        if failed:
            line += f" ({failed} failed)"
        if offline_done is not None:
            line += f", {offline_done} offline done"
        pad = max(0, self._width - len(line))  # blank out what a longer previous line left
        self._width = len(line)
        self.stream.write(line + " " * pad)
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False
