"""Watchers: open streams per workflow, reported per process with a TTL and summed."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from server import redis_keys
from server.streams import watchers
from server.streams.watchers import Reporter, WatcherCounts
from testing.procs import RedisProcess, ServerProcess
from tests.conftest import Serve

pytestmark = pytest.mark.backends("fakeredis", "redis", "cluster")

JSON = {"Content-Type": "application/json"}
STARTED = [{"event_type": "node_started", "node_id": "a"}]


class Reporters:
    """Reporters on one unique key prefix; their keys are deleted after the test."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.prefix = "test-" + uuid.uuid4().hex[:12]
        self.made: list[Reporter] = []

    def __call__(self, **options: Any) -> Reporter:
        reporter = Reporter(self.redis, WatcherCounts(), prefix=self.prefix, **options)
        self.made.append(reporter)
        return reporter

    async def read(self, *workflow_ids: str) -> dict[str, int]:
        return await watchers.watchers(self.redis, list(workflow_ids), prefix=self.prefix)


@pytest.fixture
async def reporters(redis: Any) -> AsyncIterator[Reporters]:
    made = Reporters(redis)
    yield made
    for reporter in made.made:
        await redis.delete(reporter.key)
    await redis.delete(redis_keys.watcher_procs_key(prefix=made.prefix))


async def test_counts_of_several_processes_are_summed(reporters: Reporters) -> None:
    one, two = reporters(), reporters()
    for _ in range(2):
        one.counts.opened("a")
    one.counts.opened("b")
    two.counts.opened("a")
    await one.report()
    await two.report()
    assert await reporters.read("a", "b", "c") == {"a": 3, "b": 1, "c": 0}
    one.counts.closed("a")
    one.counts.closed("b")
    await one.report()  # a diff: only a and b are sent
    assert await reporters.read("a", "b", "a") == {"a": 2, "b": 0}
    assert await reporters.read() == {}


async def test_a_process_that_stops_reporting_stops_counting_after_its_ttl(
    reporters: Reporters,
) -> None:
    alive, dead = reporters(), reporters(ttl_ms=300)
    alive.counts.opened("wf")
    dead.counts.opened("wf")
    await alive.report()
    await dead.report()
    assert await reporters.read("wf") == {"wf": 2}
    await asyncio.sleep(0.5)  # `dead` says nothing more, as after a SIGKILL
    assert await reporters.read("wf") == {"wf": 1}


async def test_a_lost_report_is_written_whole_again(redis: Any, reporters: Reporters) -> None:
    reporter = reporters()
    reporter.counts.opened("a")
    reporter.counts.opened("b")
    await reporter.report()
    await redis.delete(reporter.key)  # expired meanwhile, or lost in a failover
    reporter.counts.opened("c")
    await reporter.report()  # the diff (c) finds no hash: everything is sent
    assert await reporters.read("a", "b", "c") == {"a": 1, "b": 1, "c": 1}


async def test_an_idle_process_writes_nothing_and_a_clean_exit_removes_its_report(
    redis: Any, reporters: Reporters
) -> None:
    idle, busy = reporters(), reporters()
    await idle.report()
    assert await redis.exists(idle.key, redis_keys.watcher_procs_key(prefix=reporters.prefix)) == 0
    busy.counts.opened("a")
    await busy.report()
    busy.counts.closed("a")
    await busy.report()
    assert await redis.exists(busy.key) == 0  # no streams: no fields, no hash
    busy.counts.opened("a")
    await busy.report()
    await busy.remove()
    assert await redis.exists(busy.key, redis_keys.watcher_procs_key(prefix=reporters.prefix)) == 0
    assert await reporters.read("a") == {"a": 0}


async def test_the_report_refreshes_its_ttl_and_odd_ids_round_trip(
    redis: Any, reporters: Reporters
) -> None:
    reporter = reporters()
    odd = "품질.판정_1-" + "x" * 100
    reporter.counts.opened(odd)
    for _ in range(watchers.FULL_EVERY + 2):  # diffs, then a full rewrite, then diffs
        await reporter.report()
    assert 0 < await redis.pttl(reporter.key) <= watchers.TTL_MS
    assert await reporters.read(odd) == {odd: 1}


# Over the wire: the streams of real apps --------------------------------------------------


async def publish(base: str, wf: str) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{base}/workflows/{wf}/events", data=json.dumps(STARTED), headers=JSON) as resp,
    ):
        assert resp.status == 201, await resp.text()


async def open_streams(stack: AsyncExitStack, base: str, wf: str) -> None:
    """One event stream, one progress stream and one WebSocket on `wf`, left open."""
    s = await stack.enter_async_context(aiohttp.ClientSession())
    sse = await stack.enter_async_context(s.get(f"{base}/workflows/{wf}/events"))
    assert sse.status == 200
    progress = await stack.enter_async_context(
        s.get(f"{base}/workflows/{wf}/progress", headers={"Accept": "text/event-stream"})
    )
    assert progress.status == 200
    await stack.enter_async_context(s.ws_connect(f"{base.replace('http', 'ws')}/workflows/{wf}/ws"))


async def eventually(
    read: Callable[[], Awaitable[dict[str, int]]], expected: dict[str, int], within: float
) -> float:
    """Seconds until `read()` gives `expected`; fails after `within`."""
    started = time.monotonic()
    got: dict[str, int] = {}
    while time.monotonic() - started < within:
        got = await read()
        if got == expected:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"after {within} s: {got}, expected {expected}")


async def test_streams_of_two_apps_are_counted_and_uncounted(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    one, two = await serve(), await serve()
    wf, other = new_workflow(), new_workflow()
    await publish(one, wf)

    def read() -> Awaitable[dict[str, int]]:
        return watchers.watchers(redis, [wf, other])

    async with AsyncExitStack() as stack:
        await open_streams(stack, one, wf)
        async with AsyncExitStack() as inner:
            await open_streams(inner, two, wf)
            await eventually(read, {wf: 6, other: 0}, within=3.0)
        await eventually(read, {wf: 3, other: 0}, within=3.0)
    await eventually(read, {wf: 0, other: 0}, within=3.0)


async def test_watchers_across_two_server_processes_and_after_one_is_killed() -> None:
    # A private Redis: the processes' reports never mix with another test's.
    private = RedisProcess()
    private.start()
    env = {"REDIS_URL": private.url}
    a, b = ServerProcess(env=env, clean=True), ServerProcess(env=env, clean=True)
    client = Redis.from_url(private.url)
    wf, quiet = "w-" + uuid.uuid4().hex[:8], "q-" + uuid.uuid4().hex[:8]

    def read() -> Awaitable[dict[str, int]]:
        return watchers.watchers(client, [wf, quiet])

    try:
        await asyncio.gather(a.start(), b.start())
        await publish(a.url, wf)
        async with AsyncExitStack() as on_b:
            await open_streams(on_b, b.url, wf)
            async with AsyncExitStack() as on_a:
                await open_streams(on_a, a.url, wf)
                s = await on_a.enter_async_context(aiohttp.ClientSession())
                # A workflow with no events yet: its stream waits, and counts.
                await on_a.enter_async_context(s.get(f"{a.url}/workflows/{quiet}/events"))
                took = await eventually(read, {wf: 6, quiet: 1}, within=5.0)
                assert took < 3.0
                a.end(signal.SIGKILL)  # no goodbye: only the TTL takes its counts away
                killed = time.monotonic()
                await eventually(read, {wf: 3, quiet: 0}, within=watchers.TTL_MS / 1000 + 3)
                assert time.monotonic() - killed <= watchers.TTL_MS / 1000 + 2.5
            await eventually(read, {wf: 3, quiet: 0}, within=1.0)
        await eventually(read, {wf: 0, quiet: 0}, within=3.0)
        b.end(signal.SIGTERM)
        assert "Traceback" not in b.output(), b.output()
    finally:
        a.stop()
        b.stop()
        await client.aclose()
        private.kill()
