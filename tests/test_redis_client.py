"""The command pool: idle connections handed out directly, blocking only when exhausted;
command deadlines kept by one sweep instead of a timer per command."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server import redis_client, redis_keys
from server.app import create_app
from server.settings import Settings
from testing.cleanup import forget
from testing.procs import RedisProcess
from tests.conftest import real_redis_or_skip


async def test_a_burst_larger_than_the_pool_waits_and_every_command_succeeds() -> None:
    await (await real_redis_or_skip()).aclose()
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    async with redis_client.open_redis(url) as client:
        assert isinstance(client, redis_client._Client)  # a plain URL: no cluster client
        pool = client.connection_pool
        assert isinstance(pool, redis_client._Pool)
        results = await asyncio.gather(*(client.blpop(["no-such-list"], 0.05) for _ in range(150)))
        assert results == [None] * 150  # 150 blocking commands through 64 connections
        created = len(pool._available_connections) + len(pool._in_use_connections)
        assert created == redis_client.POOL_SIZE and not pool._in_use_connections
        for _ in range(200):  # one at a time: the same idle connection comes back
            assert await client.ping()
        assert len(pool._available_connections) == redis_client.POOL_SIZE


async def test_a_connection_the_server_dropped_is_reconnected_on_its_next_use() -> None:
    admin = await real_redis_or_skip()
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        async with redis_client.open_redis(url) as client:
            await client.client_setname("wfsse-pool-test")
            ids = [c["id"] for c in await admin.client_list() if c.get("name") == "wfsse-pool-test"]
            assert ids
            for cid in ids:
                await admin.client_kill_filter(_id=cid)
            await asyncio.sleep(0.05)
            # As with redis-py's own pool, the command that finds it closed fails (and
            # disconnects it); the next use of that connection connects again.
            with contextlib.suppress(RedisConnectionError):
                await client.ping()
            assert await client.ping()
    finally:
        await admin.aclose()


async def test_a_call_past_its_deadline_fails_with_redis_timeout_and_others_are_untouched() -> None:
    deadlines = redis_client.Deadlines(0.2)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    slow = asyncio.ensure_future(deadlines.run(asyncio.sleep(30)))
    quick = asyncio.ensure_future(deadlines.run(asyncio.sleep(0.05, "answer")))
    assert await quick == "answer"
    with pytest.raises(RedisTimeoutError):
        await slow
    took = loop.time() - t0
    assert 0.2 <= took < 0.2 + redis_client.SWEEP_SECONDS + 0.5
    assert not deadlines._running and not deadlines._expired


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    deadlines = redis_client.Deadlines(10)
    task = asyncio.ensure_future(deadlines.run(asyncio.sleep(30)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not deadlines._running


async def test_an_outside_cancellation_at_the_deadline_is_not_swallowed() -> None:
    deadlines = redis_client.Deadlines(0.05)

    async def call() -> None:
        await deadlines.run(asyncio.sleep(30))

    task = asyncio.ensure_future(call())
    while not deadlines._expired:  # the sweep has cancelled it; the task has not run yet
        await asyncio.sleep(0)
    task.cancel()  # and so does its owner (a client that went away)
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_nested_call_keeps_the_outer_deadline() -> None:
    deadlines = redis_client.Deadlines(0.2)

    async def outer() -> None:
        await deadlines.run(asyncio.sleep(0.01))  # registers and unregisters on its own
        await deadlines.run(deadlines.run(asyncio.sleep(30)))

    with pytest.raises(RedisTimeoutError):
        await outer()
    assert not deadlines._running


def test_the_command_client_takes_its_timeout_from_the_url_and_arms_no_socket_timeout() -> None:
    client = redis_client.command_client("redis://127.0.0.1:6379/0?socket_timeout=0.75")
    assert isinstance(client, redis_client._Client)
    assert client.deadlines.seconds == 0.75
    assert client.connection_pool.connection_kwargs["socket_timeout"] is None
    plain = redis_client.command_client("redis://127.0.0.1:6379/0")
    assert isinstance(plain, redis_client._Client)
    assert plain.deadlines.seconds == redis_client.COMMAND_TIMEOUT


async def test_a_frozen_redis_fails_commands_and_publishes_in_time_then_recovers() -> None:
    """SIGSTOP: the socket stays open and nothing answers, so only a deadline ends a call."""
    proc = RedisProcess()
    proc.start()
    assert proc.proc is not None
    url = proc.url + "?socket_timeout=0.5"
    server = TestServer(create_app(Settings(redis_url=url)), host="127.0.0.1")
    await server.start_server()
    base, wf = str(server.make_url("")).rstrip("/"), "frozen-" + uuid.uuid4().hex[:8]
    event = {"event_type": "node_started", "node_id": "a"}
    try:
        async with redis_client.open_redis(url) as client, aiohttp.ClientSession() as s:
            assert await client.ping()
            async with s.post(f"{base}/workflows/{wf}/events", json=event) as resp:
                assert resp.status == 201
            proc.proc.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                await client.ping()
            with pytest.raises(RedisTimeoutError):
                async with client.pipeline(transaction=True) as pipe:
                    pipe.get("a")
                    pipe.get("b")
                    await pipe.execute()
            assert time.monotonic() - t0 < 2 * (0.5 + redis_client.SWEEP_SECONDS) + 1
            t0 = time.monotonic()
            async with s.post(f"{base}/workflows/{wf}/events", json=event) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"]  # SPEC's 503
                assert resp.content_type == "application/problem+json"
            assert time.monotonic() - t0 < 0.5 + redis_client.SWEEP_SECONDS + 1
            proc.proc.send_signal(signal.SIGCONT)
            assert await client.ping()  # the timed-out connection was dropped, a new one used
            async with s.post(f"{base}/workflows/{wf}/events", json=event) as resp:
                assert resp.status == 201
            async with s.get(f"{base}/workflows/{wf}/progress") as resp:
                assert resp.status == 200
    finally:
        if proc.proc is not None:
            proc.proc.send_signal(signal.SIGCONT)
        await server.close()
        proc.kill()


class _WriterGone:
    """What a command finds where its connection's writer was, after another task closed
    that connection under it (a cluster client dropping a failed node's connections): not
    a writer. redis-py then fails inside its own code with an AttributeError."""

    def __init__(self, real: asyncio.StreamWriter) -> None:
        self._real = real

    def close(self) -> None:
        self._real.close()

    async def wait_closed(self) -> None:
        await self._real.wait_closed()


@pytest.mark.parametrize("kind", ["redis", "cluster"])
async def test_a_connection_closed_under_an_append_is_a_503_and_its_retry_is_stored_once(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen in a Cluster failover test: `'NoneType' object has no attribute 'writelines'`
    from redis-py answered 500. A lost connection is a 503 outcome-unknown (the script may
    have run), and the client's retry with the same idempotency key stores the event once."""
    await (await real_redis_or_skip()).aclose()
    if kind == "redis":
        url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        client: Any = redis_client.command_client(url)
    else:
        plain = request.getfixturevalue("cluster_url")
        url = plain.replace("redis://", "redis+cluster://", 1)
        client = RedisCluster.from_url(plain)
    wf = "closed-under-" + uuid.uuid4().hex[:8]
    armed = [True]
    original = AbstractConnection.send_packed_command

    async def send(self: Any, command: Any, check_health: bool = True) -> None:
        parts: list[bytes] = (
            [command.encode() if isinstance(command, str) else command]
            if isinstance(command, bytes | str)
            else list(command)
        )
        packed = b"".join(parts)
        if armed and b"EVALSHA" in packed and wf.encode() in packed:  # the append script
            armed.clear()
            self._writer = _WriterGone(self._writer)
        await original(self, parts, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", send)
    server = TestServer(create_app(Settings(redis_url=url)), host="127.0.0.1")
    await server.start_server()
    event = {"event_type": "node_started", "node_id": "a", "idempotency_key": "k1"}
    try:
        async with aiohttp.ClientSession() as s:
            post = f"{str(server.make_url('')).rstrip('/')}/workflows/{wf}/events"
            async with s.post(post, json=event) as resp:
                body = await resp.json()
                assert (resp.status, body["type"]) == (503, "/problems/outcome-unknown"), body
            assert not armed  # the broken write was the append's
            async with s.post(post, json=event) as resp:
                assert resp.status == 201, await resp.text()
                (event_id,) = (await resp.json())["ids"]
        assert [e.decode() for e, _ in await client.xrange(redis_keys.stream_key(wf))] == [event_id]
    finally:
        await server.close()
        await forget(client, [wf])
        await client.aclose()
