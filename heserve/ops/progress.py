"""Progress for long work (catalog encoding) on standard error.

On a terminal with text logs, a bar redrawn in place. Anywhere else (a pipe, a file,
a log shipper, or JSON logs) progress is log records of the `heserve.progress` logger,
so that standard error carries one format: every line a JSON object with `--log-format
json`, every line key=value pairs with text.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger("heserve.progress")
_SECONDS_BETWEEN_RECORDS = 2.0


class ProgressBar:
    """A `Progress` callback: a redrawn bar on a terminal (`draw`), else a log record
    every few seconds and one at the end, with `task`, `done`, `total` and `seconds`."""

    def __init__(self, label: str, stream: TextIO = sys.stderr, *, draw: bool = True) -> None:
        self.label = label
        self.stream = stream
        self._start = time.perf_counter()
        self._last_record = -_SECONDS_BETWEEN_RECORDS
        self._bar = draw and stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self._start
        fraction = done / total if total else 1.0
        if self._bar:
            filled = int(30 * fraction)
            bar = "#" * filled + "." * (30 - filled)
            end = "\n" if done >= total else ""
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {elapsed:5.1f}s{end}")
            self.stream.flush()
        elif done >= total or elapsed - self._last_record >= _SECONDS_BETWEEN_RECORDS:
            self._last_record = elapsed
            log.info(
                "%s: %d/%d (%.0f%%) %.1fs",
                self.label,
                done,
                total,
                100 * fraction,
                elapsed,
                extra={
                    "fields": {
                        "task": self.label,
                        "done": done,
                        "total": total,
                        "seconds": round(elapsed, 3),
                    }
                },
            )
