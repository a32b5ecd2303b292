"""Rate-limited logging: a flood of bad messages must not become a flood of log lines."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np


class RateLimitedLog:
    """At most one line per key (a reason) per ``interval`` seconds; the next line says how many were held back."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, level: int, key: str, message: str, *args: object) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            message += " (%d more like it in the last %.1f s not logged)"
            args = (*args, held, self.interval)
        self.logger.log(level, message, *args)
        return True


def describe_ids(ids: np.ndarray | None, shown: int = 4) -> str:
    """Event ids for a log line: the first few and how many in all."""
    if ids is None or not len(ids):
        return "unknown"
    head = ", ".join(str(int(i)) for i in ids[:shown])
    return head if len(ids) <= shown else f"{head}, ... ({len(ids)} cells)"
