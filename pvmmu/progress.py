"""A one-line progress display for long commands (``pvmmu fuzz``, ``pvmmu stress``)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Redraws one status line on a terminal; elsewhere (a log, CI) prints a line every ``every_s``."""

    def __init__(self, enabled: bool = True, stream: TextIO = sys.stderr, every_s: float = 10.0) -> None:
        self.enabled = enabled
        self.stream = stream
        self.tty = stream.isatty()
        self.every_s = 0.2 if self.tty else every_s
        self._last = 0.0
        self._drawn = False

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < self.every_s):
            return
        self._last = now
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        """Leave the status line in place and move below it."""
        if self.enabled and self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
