"""Log lines that a fault may repeat many times a second, at most one per kind per interval."""

from __future__ import annotations

import logging
import time
from collections import Counter

LOG_INTERVAL = 10.0  # seconds between two lines of one kind


class Throttle:
    """At most one log line per kind per `interval`; the next says how many were held back."""

    def __init__(self, log: logging.Logger, interval: float = LOG_INTERVAL) -> None:
        self.log = log
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def __call__(
        self,
        level: int,
        kind: str,
        msg: str,
        *args: object,
        exc_info: BaseException | None = None,
    ) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._held[kind] += 1
            return
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        if held:
            msg += " (and %d more like it in the last %.0f s)"
            args = (*args, held, now - (last or now))
        self.log.log(level, msg, *args, exc_info=exc_info)
