"""WORKERS=N: several processes share one port, are supervised, and stop together."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import aiohttp

from server import redis_keys
from testing.procs import ServerProcess
from testing.sse import collect
from tests.conftest import REDIS_URL, real_redis_or_skip


async def pids_seen(url: str, tries: int = 40) -> set[int]:
    """Fresh connections, so SO_REUSEPORT can hand each to any worker."""
    pids: set[int] = set()
    for _ in range(tries):
        async with aiohttp.ClientSession() as s, s.get(f"{url}/healthz") as resp:
            pids.add((await resp.json())["pid"])
    return pids


async def both_workers(url: str) -> set[int]:
    """The pids of the two workers: the supervisor answers ready with its first one, the
    second may still be starting."""
    deadline = time.monotonic() + 15
    pids: set[int] = set()
    while len(pids) < 2 and time.monotonic() < deadline:
        pids |= await pids_seen(url, tries=10)
    assert len(pids) == 2, pids
    return pids


async def test_two_workers_share_the_port_restart_on_crash_and_stop_on_sigterm() -> None:
    real = await real_redis_or_skip()
    await real.aclose()
    server = ServerProcess("--workers", "2", env={"REDIS_URL": REDIS_URL})
    await server.start()
    wf = "workers-" + uuid.uuid4().hex[:8]
    try:
        pids = await both_workers(server.url)
        assert server.proc is not None and server.proc.pid not in pids
        # A stream on one worker sees what is published through the other.
        async with aiohttp.ClientSession() as s:
            reader = asyncio.create_task(collect(s, f"{server.url}/workflows/{wf}/events"))
            for node in ("a", "b"):
                async with (
                    aiohttp.ClientSession() as p,
                    p.post(
                        f"{server.url}/workflows/{wf}/events",
                        json={"event_type": "node_started", "node_id": node},
                    ) as resp,
                ):
                    assert resp.status == 201
            async with s.post(
                f"{server.url}/workflows/{wf}/events",
                json={"event_type": "workflow_state_changed", "to_state": "COMPLETED"},
            ) as resp:
                assert resp.status == 201
            assert [m.event for m in await reader] == ["node_started"] * 2 + [
                "workflow_state_changed"
            ]
        # A worker that dies is replaced.
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            now = await pids_seen(server.url, tries=20)
            if len(now) == 2 and victim not in now:
                break
            assert time.monotonic() < deadline, now
            await asyncio.sleep(0.2)
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait(6) == 0 and time.monotonic() - started < 5
        for pid in now:
            assert (
                not os.path.exists(f"/proc/{pid}")
                or "zombie" in open(f"/proc/{pid}/status").read().lower()
            )
    finally:
        server.stop()
        real = await real_redis_or_skip()
        await real.delete(*redis_keys.workflow_keys(wf))
        await real.aclose()


async def test_workers_exit_when_the_supervisor_is_killed() -> None:
    real = await real_redis_or_skip()
    await real.aclose()
    server = ServerProcess("--workers", "2", env={"REDIS_URL": REDIS_URL})
    await server.start()
    try:
        pids = await both_workers(server.url)
        server.signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{pid}") for pid in pids):
            assert time.monotonic() < deadline, "orphaned workers outlived their supervisor"
            await asyncio.sleep(0.05)
    finally:
        server.stop()


async def test_an_open_server_with_workers_says_so_once_at_start() -> None:
    real = await real_redis_or_skip()
    await real.aclose()
    # clean: no PUBLISH_TOKEN or SUBSCRIBE_SECRET from the test's own environment.
    server = ServerProcess("--workers", "2", env={"REDIS_URL": REDIS_URL}, clean=True)
    await server.start()
    try:
        # Both workers up, so a line either of them logged at start is in the log by now.
        await both_workers(server.url)
        server.signal(signal.SIGTERM)
        assert server.wait(6) == 0
        log = server.output()
        for line in ("PUBLISH_TOKEN is unset", "SUBSCRIBE_SECRET is unset"):
            assert log.count(line) == 1, log
    finally:
        server.stop()
