"""Waiting for a condition that has no event to await (Redis-side state, another process)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable


async def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    what: str = "the condition",
    *,
    every: float = 0.05,
) -> float:
    """Poll `predicate()` (a value, or an awaitable of one) every `every` s until it is
    true; the `time.monotonic()` at which it was. An AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        held = predicate()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return time.monotonic()
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(every)
