"""A progress bar on stderr for long CLI work: redrawn in place on a terminal,
one line per tenth of the work otherwise (so that logs stay readable)."""

from __future__ import annotations

import sys
import time
from typing import IO


class Progress:
    def __init__(self, total: int, label: str, stream: IO[str] | None = None, width: int = 30) -> None:
        self.total, self.label, self.width = max(total, 1), label, width
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.done = 0
        self.started = time.monotonic()
        self._last_tenth = -1

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        tenth = self.done * 10 // self.total
        if self.tty:
            self._draw("\r")
        elif tenth != self._last_tenth:
            self._last_tenth = tenth
            self._draw("", "\n")

    def close(self) -> None:
        if self.tty:
            self._draw("\r", "\n")

    def _draw(self, start: str, end: str = "") -> None:
        filled = self.width * self.done // self.total
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"{start}{self.label} [{bar}] {100 * self.done // self.total:3d}% "
                          f"{self.done}/{self.total} eta {eta:.0f}s{end}")
        self.stream.flush()
