"""Opening the Redis client: the embedded fakeredis default, a server, or a cluster."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from .store import AnyRedis

logger = logging.getLogger(__name__)

POOL_SIZE = 64  # Redis connections per process for commands (pub/sub has its own)
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


class _Pool(BlockingConnectionPool):
    """A BlockingConnectionPool that hands out an idle connection directly.

    The parent takes a lock, arms a timeout and records wait-time metrics for every command,
    5 to 8% of the server's CPU per published event; none of that is needed while a
    connection is free and nobody waits. When the pool is exhausted (or in maintenance) the
    parent's blocking, first-come first-served path is taken as before.
    """

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        cond = self._condition
        if (
            self._available_connections
            and not getattr(self, "_in_maintenance", False)
            and not cond.locked()
            and not getattr(cond, "_waiters", None)
        ):
            connection = self._available_connections.pop()
            self._in_use_connections.add(connection)
            try:
                await self.ensure_connection(connection)  # reconnects a stale one
            except BaseException:
                await self.release(connection)
                raise
            return connection
        return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]


@asynccontextmanager
async def open_redis(url: str | None) -> AsyncIterator[AnyRedis]:
    """Yield a client: fakeredis without a URL, a cluster client for `redis+cluster://`."""
    client: AnyRedis
    if not url:
        import fakeredis

        logger.warning(
            "REDIS_URL is unset: using an embedded in-memory Redis (fakeredis); "
            "events live only as long as this process"
        )
        client = fakeredis.FakeAsyncRedis()
    else:
        parts = urlsplit(url)
        if parts.scheme in CLUSTER_SCHEMES:
            plain = urlunsplit(parts._replace(scheme=CLUSTER_SCHEMES[parts.scheme]))
            client = RedisCluster.from_url(plain)
            try:
                # Learn the slots now: the lazy first-use initialisation is not safe against
                # concurrent first commands (some fail with an AttributeError in redis-py).
                await client.initialize()
            except RedisError as exc:
                logger.warning("Redis Cluster not reachable at start (%s); retrying on use", exc)
        else:
            # Block for a free connection instead of failing: a burst of streams opening at
            # once must queue for the pool, not answer 503 ("Too many connections").
            pool = _Pool.from_url(url, max_connections=POOL_SIZE, timeout=10)
            client = Redis.from_pool(pool)  # owns the pool: aclose() disconnects it
        logger.info("using Redis at %s", _redact(url))
    try:
        yield client
    finally:
        await client.aclose()


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
