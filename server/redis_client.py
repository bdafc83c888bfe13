"""Opening the Redis client: the embedded fakeredis default, a server, or a cluster."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from .store import AnyRedis

logger = logging.getLogger(__name__)

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


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
        else:
            client = Redis.from_url(url)
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
