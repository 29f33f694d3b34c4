"""Progress for long work (catalog encoding, key generation) on standard error."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """A `Progress` callback: a redrawn bar on a terminal, a few lines elsewhere."""

    def __init__(self, label: str, stream: TextIO = sys.stderr) -> None:
        self.label = label
        self.stream = stream
        self._start = time.perf_counter()
        self._last_line = -1.0
        self._tty = stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self._start
        fraction = done / total if total else 1.0
        if self._tty:
            filled = int(30 * fraction)
            bar = "#" * filled + "." * (30 - filled)
            end = "\n" if done >= total else ""
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {elapsed:5.1f}s{end}")
        elif done >= total or elapsed - self._last_line >= 2.0:
            self._last_line = elapsed
            self.stream.write(f"{self.label}: {done}/{total} ({fraction:.0%}) {elapsed:.1f}s\n")
        self.stream.flush()
