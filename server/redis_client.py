"""Opening the Redis client: the embedded fakeredis default, a server, Sentinel, or a cluster."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)

# Either client: most of the server works on a single Redis and a Cluster alike.
AnyRedis = Redis | RedisCluster

POOL_SIZE = 64  # Redis connections per process for commands (pub/sub has its own)
COMMAND_TIMEOUT = 5.0  # seconds; redis-py's default socket_timeout, `?socket_timeout=` in URLs
SWEEP_SECONDS = 0.5  # how often overdue commands are looked for

T = TypeVar("T")
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
SENTINEL_SCHEMES = {"redis+sentinel": "redis", "rediss+sentinel": "rediss"}
SCHEMES = {"redis", "rediss", "unix", *CLUSTER_SCHEMES, *SENTINEL_SCHEMES}
SENTINEL_PORT = 26379  # a sentinel host without a port
# A sentinel answers SENTINEL MASTERS at once; one that does not within this is skipped for
# the next one (each connection to the primary asks, so a dead sentinel must cost little).
SENTINEL_TIMEOUT = 1.0


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


class _SentinelPool(SentinelConnectionPool, _Pool):
    """_Pool's blocking, fast hand-out over connections to whichever node Sentinel names
    primary: a connection (re)connecting asks the sentinels for the primary's address."""


_REDIS_CODE = os.path.dirname(redis.__file__) + os.sep


def closed_under(exc: BaseException) -> RedisConnectionError | None:
    """A ConnectionError for an AttributeError or TypeError raised inside redis-py itself,
    else None. When a connection is disconnected by another task while a command is on it
    (a cluster client dropping a failed node's connections during a failover), redis-py's
    next step finds `_writer` or `_reader` gone and fails with `'NoneType' object has no
    attribute 'writelines'`: a lost connection, to be answered as one (503), not a 500."""
    if not isinstance(exc, AttributeError | TypeError):
        return None
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or not tb.tb_frame.f_code.co_filename.startswith(_REDIS_CODE):
        return None
    return RedisConnectionError(f"the connection was closed under the command ({exc})")


class Deadlines:
    """Fails Redis calls that run past a deadline, with one timer for all of them.

    redis-py's socket_timeout arms an asyncio timer per command, and a task per command
    sent. A cancelled timer stays in the event loop's heap until it would have fired, so at
    1,000 commands/s several thousand are alive at any moment, and every young-generation
    garbage collection scans them (2 to 15 ms pauses under load). Here a call only
    registers its task; a sweep every SWEEP_SECONDS cancels the ones past their deadline,
    which fail with redis' TimeoutError (so a call fails between `seconds` and `seconds` +
    SWEEP_SECONDS after it started).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._running: dict[asyncio.Task[Any], float] = {}  # task -> deadline
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def run(self, call: Awaitable[T]) -> T:
        task = asyncio.current_task()
        if task is None or task in self._running:  # nested: the outer deadline holds
            return await call
        loop = asyncio.get_running_loop()
        self._running[task] = loop.time() + self.seconds
        if self._timer is None:
            self._timer = loop.call_later(SWEEP_SECONDS, self._sweep)
        cancelling = task.cancelling()
        try:
            return await call
        except asyncio.CancelledError:
            # As asyncio.timeout(): a cancellation someone else asked for too stays one.
            if task not in self._expired or task.uncancel() > cancelling:
                raise
            raise RedisTimeoutError(f"Redis did not answer within {self.seconds:g} s") from None
        except (AttributeError, TypeError) as exc:
            lost = closed_under(exc)
            if lost is None:
                raise
            raise lost from exc
        finally:
            del self._running[task]
            self._expired.discard(task)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for task, deadline in self._running.items():
            if deadline <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()  # redis-py drops a connection a cancelled call was using
        self._timer = loop.call_later(SWEEP_SECONDS, self._sweep) if self._running else None


class _Pipeline(Pipeline):
    deadlines: Deadlines

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        return await self.deadlines.run(super().execute(raise_on_error))


class _Client(Redis):
    """A client whose commands and pipelines fail after `deadlines.seconds` (see Deadlines)."""

    deadlines: Deadlines

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        call = super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        return await self.deadlines.run(call)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> _Pipeline:
        pipe = _Pipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.deadlines = self.deadlines
        return pipe


class _Cluster(RedisCluster):
    """A cluster client whose commands fail as redis errors, never as AttributeError, when a
    failover closes a connection under them (see closed_under)."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except (AttributeError, TypeError) as exc:
            lost = closed_under(exc)
            if lost is None:
                raise
            raise lost from exc


def command_client(url: str) -> Redis:
    """A pooled client for `url` (not a cluster) whose commands time out (see Deadlines)."""
    # Block for a free connection instead of failing: a burst of streams opening at once
    # must queue for the pool, not answer 503 ("Too many connections").
    pool = _Pool.from_url(url, max_connections=POOL_SIZE, timeout=10)
    seconds = pool.connection_kwargs.get("socket_timeout", COMMAND_TIMEOUT)
    pool.connection_kwargs["socket_timeout"] = None  # the deadline below replaces it
    client = cast(_Client, _Client.from_pool(pool))  # owns the pool: aclose() disconnects it
    client.deadlines = Deadlines(seconds if seconds else float("inf"))
    return client


class _SentinelClient(_Client):
    """A command client of the primary Sentinel names; closing it closes the sentinels'."""

    sentinels: Sentinel

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            await self.sentinels.aclose()


@dataclass(frozen=True)
class SentinelURL:
    """`redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db][?...]`."""

    sentinels: list[tuple[str, int]]
    service: str
    connection: dict[str, Any]  # for the data nodes (the primary, through the pool)
    sentinel: dict[str, Any]  # for the sentinels


def parse_sentinel_url(url: str) -> SentinelURL:
    """Split a Sentinel URL; ValueError with a sentence for a malformed one.

    The credentials before `@` are the data nodes'; `sentinel_username` and
    `sentinel_password` in the query are the sentinels' (none by default). `rediss+sentinel`
    speaks TLS to both, with the URL's `ssl_*` options. Other query options (`db`,
    `socket_timeout`, `socket_connect_timeout`, ...) are redis-py's URL options for the
    data nodes.
    """
    parts = urlsplit(url)
    plain = SENTINEL_SCHEMES.get(parts.scheme)
    if plain is None:
        raise ValueError(f"not a Sentinel URL (redis+sentinel:// or rediss+sentinel://): {url!r}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    sentinels = [_host_port(item, url) for item in hostlist.split(",") if item.strip()]
    if not sentinels:
        raise ValueError("REDIS_URL names no sentinel host: redis+sentinel://host:26379/service")
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError(
            "REDIS_URL must name the Sentinel service (and optionally the db): "
            f"redis+sentinel://host:26379/<service>[/<db>], got path {parts.path!r}"
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    auth = {k: v for k, v in query if k in ("sentinel_username", "sentinel_password")}
    rest = urlencode([(k, v) for k, v in query if k not in auth])
    # redis-py parses the data nodes' options (types, credentials) as for redis://.
    netloc = f"{userinfo}@sentinel" if userinfo else "sentinel"
    db = f"/{path[1]}" if len(path) == 2 else ""
    try:
        connection: dict[str, Any] = dict(parse_url(urlunsplit((plain, netloc, db, rest, ""))))
    except ValueError as exc:
        raise ValueError(f"REDIS_URL: {exc}") from None
    connection.pop("host", None)
    connection.pop("port", None)
    tls = connection.pop("connection_class", None) is not None  # SSLConnection for rediss
    sentinel: dict[str, Any] = {
        "socket_timeout": SENTINEL_TIMEOUT,
        "socket_connect_timeout": SENTINEL_TIMEOUT,
    }
    if auth.get("sentinel_username"):
        sentinel["username"] = auth["sentinel_username"]
    if auth.get("sentinel_password"):
        sentinel["password"] = auth["sentinel_password"]
    if tls:
        connection["ssl"] = True  # the pool picks its TLS connection class from this
        sentinel["ssl"] = True
        sentinel.update({k: v for k, v in connection.items() if k.startswith("ssl_")})
    return SentinelURL(sentinels, path[0], connection, sentinel)


def _host_port(item: str, url: str) -> tuple[str, int]:
    item = item.strip()
    host, port = item, ""
    if item.startswith("["):  # [IPv6]:port
        host, _, tail = item[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else ""
    elif item.count(":") == 1:
        host, port = item.split(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"REDIS_URL: {item!r} is not host:port")
    return host, int(port) if port else SENTINEL_PORT


def sentinel_client(url: str) -> Redis:
    """A pooled client of the primary that `url`'s sentinels name, whose commands time out
    (see Deadlines). A connection that breaks reconnects to the primary named then, so
    commands, pub/sub and legacy ingest follow a failover without anything else to do."""
    parsed = parse_sentinel_url(url)
    sentinel = Sentinel(parsed.sentinels, sentinel_kwargs=parsed.sentinel)  # type: ignore[no-untyped-call]
    seconds = parsed.connection.pop("socket_timeout", COMMAND_TIMEOUT)
    options = {**parsed.connection, "max_connections": POOL_SIZE, "timeout": 10}
    client = cast(
        _SentinelClient,
        sentinel.master_for(
            parsed.service,
            redis_class=_SentinelClient,
            connection_pool_class=_SentinelPool,
            socket_timeout=None,  # the deadline below replaces it
            **options,
        ),
    )
    client.sentinels = sentinel
    client.deadlines = Deadlines(seconds if seconds else float("inf"))
    return client


@asynccontextmanager
async def open_redis(url: str | None) -> AsyncIterator[AnyRedis]:
    """Yield a client: fakeredis without a URL, a cluster client for `redis+cluster://`, the
    Sentinel-named primary for `redis+sentinel://`."""
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
            client = _Cluster.from_url(plain)
            try:
                # Learn the slots now: the lazy first-use initialisation is not safe against
                # concurrent first commands (some fail with an AttributeError in redis-py).
                await client.initialize()
            except RedisError as exc:
                logger.warning("Redis Cluster not reachable at start (%s); retrying on use", exc)
        elif parts.scheme in SENTINEL_SCHEMES:
            client = sentinel_client(url)
        else:
            client = command_client(url)
        logger.info("using Redis at %s", _redact(url))
    try:
        yield client
    finally:
        await client.aclose()


def _redact(url: str) -> str:
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if ":" in userinfo:
        parts = parts._replace(netloc=userinfo.split(":", 1)[0] + ":***" + at + hosts)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any("password" in k for k, _ in query):
        masked = [(k, "***" if "password" in k else v) for k, v in query]
        parts = parts._replace(query=urlencode(masked, safe="*"))
    return urlunsplit(parts)
