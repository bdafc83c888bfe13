"""Stopping background tasks at shutdown: cancel, then wait a bounded time.

A task inside a Redis call has been seen to swallow its cancellation (redis-py: a
connection's cleanup awaited in a `finally` or an `except BaseException`), so `await task`
or `gather(task)` after `cancel()` may wait for ever, and a shutdown with it: the SPEC's
exit within 5 s after SIGTERM, and a CI teardown that hung past 120 s. Every stop on the
shutdown path goes through `stop()` instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

logger = logging.getLogger(__name__)

STOP_SECONDS = 1.0  # the longest a stop waits for its cancelled tasks


async def stop(tasks: Iterable[asyncio.Task[object] | None], *, what: str) -> None:
    """Cancel `tasks` and wait up to STOP_SECONDS for them; those still running are logged
    and left to the loop (cancelled: they end at their next await that honours it)."""
    running = {t for t in tasks if t is not None and not t.done()}
    for task in running:
        task.cancel()
    if not running:
        return
    done, late = await asyncio.wait(running, timeout=STOP_SECONDS)
    for task in done:  # retrieved, so that a failure is not reported again at exit
        if not task.cancelled() and task.exception() is not None:
            logger.warning("%s: a task failed while stopping: %r", what, task.exception())
    if late:
        logger.warning("%s: %d tasks ignored their cancellation; not waited for", what, len(late))
