"""Deleting what a test's runs wrote: their keys and their run index entries (history keys
go with the test session's HISTORY_PREFIX, tests/conftest.py)."""

from __future__ import annotations

import os
from typing import Any

from redis.asyncio import Redis

from server import redis_keys
from server.overview import runs


async def forget(redis: Any, workflows: list[str]) -> None:
    """Delete the workflows' keys and their run index entries on `redis`."""
    for wf in workflows:
        await redis.delete(*redis_keys.workflow_keys(wf))
    await runs.RunIndex(redis, retention_seconds=1).forget(workflows)


async def forget_everywhere(workflows: list[str]) -> None:
    """forget() on the Redis of REDIS_URL, where a child server without a `REDIS_URL` of
    its own wrote (with it unset, the child used its embedded Redis: nothing to delete)."""
    url = os.environ.get("REDIS_URL")
    if not url:
        return
    client = Redis.from_url(url)
    try:
        await forget(client, workflows)
    finally:
        await client.aclose()
