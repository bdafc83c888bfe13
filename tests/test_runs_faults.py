"""The run list and the overview when Redis is away: 503 problems, never a 500 or a hang."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from server import app_keys
from server.app import create_app
from server.overview import feed
from server.settings import Settings
from testing.events import plan, state
from testing.http import publish
from testing.procs import app_on_own_redis

SSE = {"Accept": "text/event-stream"}


async def test_a_list_or_overview_without_redis_is_a_503_and_publishing_lists_again_after() -> None:
    async with app_on_own_redis() as (base, wf, redis_proc, _):
        await publish(base, wf, [plan("def-outage", "a"), state("RUNNING")])
        redis_proc.kill()
        async with aiohttp.ClientSession() as s:
            for headers in ({}, {"Accept": "text/event-stream"}):
                async with s.get(f"{base}/workflows", headers=headers) as resp:
                    assert resp.status == 503, await resp.text()
                    assert resp.content_type == "application/problem+json"
                    assert "Retry-After" in resp.headers
        redis_proc.start()  # empty again (no persistence): the run is gone with it
        other = "outage-" + uuid.uuid4().hex[:8]
        body = json.dumps([plan("def-outage", "a"), state("RUNNING")])
        deadline = time.monotonic() + 10
        async with aiohttp.ClientSession() as s:
            while True:  # the first command on a pooled connection may meet the old socket
                async with s.post(
                    f"{base}/workflows/{other}/events",
                    data=body,
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    if resp.status == 201:
                        break
                    assert resp.status == 503, await resp.text()
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as s, s.get(f"{base}/workflows") as resp:
            assert resp.status == 200
            body = await resp.json()
        assert [w["workflow_id"] for w in body["workflows"]] == [other]


@pytest.mark.timeout(60)
async def test_the_overview_feed_stops_within_its_bound_when_a_task_ignores_its_cancel(
    redis: Any,
) -> None:
    """A Redis client busy with a command has been seen to swallow a cancellation (see
    streams/watchers.py): a feed task in such a call made the feed's stop wait for ever,
    holding its lock, and the shutdown with it (a CI teardown hung past 120 s)."""
    app = create_app(Settings(), redis=redis)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    overview = app[app_keys.overview_key]
    done, woken = asyncio.Event(), asyncio.Event()

    async def deaf() -> None:
        while not done.is_set():
            try:
                await woken.wait()
            except asyncio.CancelledError:
                continue  # the cancellation is lost, as in that Redis call

    try:
        base = str(server.make_url("")).rstrip("/")
        async with aiohttp.ClientSession() as s, s.get(f"{base}/workflows", headers=SSE) as resp:
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")  # the feed runs: the stream got its retry:
            assert overview.running
            overview._tasks.append(asyncio.get_running_loop().create_task(deaf()))
        started = time.monotonic()
        await asyncio.wait_for(overview.close(), feed.CLOSE_SECONDS + 10)
        assert time.monotonic() - started < feed.CLOSE_SECONDS + 5
        assert not overview.running
    finally:
        done.set()
        woken.set()
        await server.close()
