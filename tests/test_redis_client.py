"""The command pool: idle connections handed out directly, blocking only when exhausted."""

from __future__ import annotations

import asyncio
import contextlib
import os

from redis.exceptions import ConnectionError as RedisConnectionError

from server import redis_client
from tests.conftest import real_redis_or_skip


async def test_a_burst_larger_than_the_pool_waits_and_every_command_succeeds() -> None:
    await (await real_redis_or_skip()).aclose()
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    async with redis_client.open_redis(url) as client:
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
