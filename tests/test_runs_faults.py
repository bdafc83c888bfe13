"""The run list and the overview when Redis is away: 503 problems, never a 500 or a hang."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import aiohttp

from testing.events import plan, state
from testing.http import publish
from testing.procs import app_on_own_redis


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
