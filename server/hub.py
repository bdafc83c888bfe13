"""One Redis pub/sub connection per process, fanned out to local subscribers."""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from . import sse, store
from .store import AnyRedis

logger = logging.getLogger(__name__)


class HubUnavailable(Exception):
    """The subscription could not be confirmed by Redis in time."""


@dataclass(frozen=True, slots=True)
class Frame:
    """A live event, encoded once per process and shared by every local subscriber."""

    key: tuple[int, int]
    id: str
    data: bytes  # the SSE frame
    ws: str  # the WebSocket text message: the event object with its `id`
    terminal: bool


def ws_text(event_id: str, data: str) -> str:
    """The stored event JSON (an object) with `"id"` first: what a WebSocket client gets."""
    return '{"id":"' + event_id + '",' + data[1:] if data != "{}" else '{"id":"' + event_id + '"}'


@dataclass(eq=False)
class Subscription:
    """One open stream's live feed: a bounded queue plus a flag that asks for a catch-up."""

    workflow_id: str
    limit: int
    queue: deque[Frame] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when live frames were dropped (overflow) or may have been missed (Redis reconnect):
    # the reader must re-read the stream after its last sent id. Cleared by the reader.
    resync: bool = False

    def offer(self, frame: Frame) -> bool:
        """Queue a live frame; on overflow drop the queue and ask for a catch-up instead."""
        if self.resync:
            return True  # the catch-up read will cover it
        if len(self.queue) >= self.limit:
            self.queue.clear()  # free it now: the stream holds every one of these
            self.resync = True
            self.wakeup.set()
            return False
        self.queue.append(frame)
        self.wakeup.set()
        return True

    def request_resync(self) -> None:
        self.queue.clear()
        self.resync = True
        self.wakeup.set()


@dataclass(eq=False)
class _Channel:
    workflow_id: str
    upstream: _Upstream
    subs: set[Subscription] = field(default_factory=set)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    outstanding: int = 0  # SUBSCRIBEs sent and not yet confirmed


def parse_message(payload: bytes) -> Frame:
    """`<id> <event_type> <terminal> <json>` (as the append script publishes) -> Frame."""
    raw_id, event_type, terminal, raw = payload.split(b" ", 3)
    event_id, data = raw_id.decode(), raw.decode()
    frame = sse.encode(data, id=event_id, event=event_type.decode())
    return Frame(store.id_key(event_id), event_id, frame, ws_text(event_id, data), terminal == b"1")


class _Upstream:
    """One pub/sub connection and its reader: one per process, or one per cluster primary."""

    def __init__(self, hub: Hub, name: str, make_client: Callable[[], Any], sharded: bool) -> None:
        self.hub = hub
        self.name = name
        self.make_client = make_client
        self.sharded = sharded  # SSUBSCRIBE on Redis Cluster, SUBSCRIBE otherwise
        self.client: Any = None
        self.pubsub: Any = None
        self.task: asyncio.Task[None] | None = None
        # Serialises (S)SUBSCRIBE/(S)UNSUBSCRIBE so two tasks never open the connection twice.
        self.lock = asyncio.Lock()

    def channels(self) -> list[str]:
        return [n for n, c in self.hub._channels.items() if c.upstream is self]

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"hub-reader {self.name}")

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task
        await self._drop()
        if self.client is not None and self.client is not self.hub._redis:
            with suppress(Exception):
                await self.client.aclose()

    async def subscribe(self, name: str, chan: _Channel) -> None:
        async with self.lock:
            if self.pubsub is None:
                return  # the reader subscribes every wanted channel when it (re)connects
            chan.outstanding += 1
            try:
                if self.sharded:
                    await self.pubsub.ssubscribe(name)
                else:
                    await self.pubsub.subscribe(name)
            except Exception as exc:  # the connection broke under us: the reader resubscribes
                logger.warning("subscribe %s failed (%s); retried on reconnect", name, exc)

    async def unsubscribe(self, name: str) -> None:
        async with self.lock:
            if self.pubsub is None:
                return
            try:
                if self.sharded:
                    await self.pubsub.sunsubscribe(name)
                else:
                    await self.pubsub.unsubscribe(name)
            except Exception as exc:  # the connection broke under us: nothing to undo
                logger.warning("unsubscribe %s failed: %s", name, exc)

    async def _drop(self) -> None:
        pubsub, self.pubsub = self.pubsub, None
        if pubsub is not None:
            with suppress(Exception):
                await pubsub.aclose()

    async def _connect(self) -> None:
        async with self.lock:
            if self.client is None:
                self.client = self.make_client()
            self.pubsub = self.client.pubsub()
            names = self.channels()
            for name in names:
                self.hub._channels[name].outstanding = 1
            # A private channel keeps the connection in subscribed mode even with no clients,
            # so the reader can block on it (PubSub returns at once when nothing is
            # subscribed).
            await self.pubsub.subscribe(self.hub._control)
            if names and not self.sharded:
                await self.pubsub.subscribe(*names)
            for name in names if self.sharded else ():
                await self.pubsub.ssubscribe(name)  # one by one: SSUBSCRIBE takes one slot

    async def _run(self) -> None:
        backoff = 0.05
        first = True
        while True:
            try:
                if self.pubsub is None:
                    await self._connect()
                    if not first:
                        self.hub.reconnects += 1
                        self.hub._on_reconnect()
                        logger.info("hub reconnected to Redis %s", self.name)
                    first = False
                    backoff = 0.05
                message = await self.pubsub.get_message(timeout=None)
                if message is not None:
                    self.hub._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection loss and any parser surprise: reconnect
                logger.warning(
                    "hub lost Redis %s (%s: %s); retrying in %.2fs",
                    self.name, type(exc).__name__, exc, backoff,
                )  # fmt: skip
                await self._drop()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)


# What a cluster node's connection settings may carry over to a plain client.
_CONN_KWARGS = {
    "host", "port", "username", "password", "db", "ssl", "ssl_ca_certs", "ssl_certfile",
    "ssl_keyfile", "ssl_cert_reqs", "socket_timeout", "socket_connect_timeout", "client_name",
}  # fmt: skip


class Hub:
    """Subscribes to a workflow's channel on its first local client, unsubscribes after the last.

    One pub/sub connection per process; on Redis Cluster one per shard primary, with
    sharded pub/sub (SSUBSCRIBE), since a workflow's channel lives on its keys' shard.
    """

    def __init__(
        self,
        redis: AnyRedis,
        *,
        queue_limit: int,
        confirm_timeout: float = 5.0,
        on_reconnect: Callable[[], None] | None = None,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self._redis = redis
        self._queue_limit = queue_limit
        self._confirm_timeout = confirm_timeout
        self._on_reconnect = on_reconnect or (lambda: None)
        self._on_overflow = on_overflow or (lambda: None)
        self._channels: dict[str, _Channel] = {}
        self._control = f"wfsse:hub:{os.getpid()}:{id(self)}"
        self._cluster = isinstance(redis, RedisCluster)
        self._upstreams: dict[str, _Upstream] = {}
        self.reconnects = 0
        self.overflows = 0  # subscribers that fell behind and were sent to catch up

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    @property
    def connection_count(self) -> int:
        """Pub/sub connections held: one, or one per cluster shard that carries a channel."""
        return len(self._upstreams)

    def queued_frames(self) -> int:
        """Live frames held for local subscribers right now (bounded by design)."""
        return sum(len(sub.queue) for chan in self._channels.values() for sub in chan.subs)

    def max_queue(self) -> int:
        """The longest subscriber queue right now."""
        return max((len(s.queue) for c in self._channels.values() for s in c.subs), default=0)

    async def start(self) -> None:
        if not self._cluster:
            self._upstream_for("")  # connect now: /readyz and the first stream find it ready

    async def close(self) -> None:
        for upstream in list(self._upstreams.values()):
            await upstream.close()
        self._upstreams.clear()

    def _upstream_for(self, channel: str) -> _Upstream:
        """The connection that carries `channel`: the shard's primary on a cluster."""
        if not self._cluster:
            key, make, sharded = "redis", lambda: self._redis, False
        else:
            cluster: Any = self._redis
            node = cluster.get_node_from_key(channel)
            key, sharded = node.name, True

            def make() -> Redis:
                kwargs = {k: v for k, v in node.connection_kwargs.items() if k in _CONN_KWARGS}
                return Redis(**kwargs)

        upstream = self._upstreams.get(key)
        if upstream is None:
            upstream = self._upstreams[key] = _Upstream(self, key, make, sharded)
            upstream.start()
        return upstream

    @asynccontextmanager
    async def subscribe(self, workflow_id: str) -> AsyncIterator[Subscription]:
        """Register a subscriber; returns once Redis confirmed the channel is subscribed."""
        name = store.channel(workflow_id)
        sub = Subscription(workflow_id, self._queue_limit)
        chan = self._channels.get(name)
        if chan is None:
            chan = self._channels[name] = _Channel(workflow_id, self._upstream_for(name))
            await chan.upstream.subscribe(name, chan)
        chan.subs.add(sub)
        try:
            try:
                await asyncio.wait_for(chan.ready.wait(), self._confirm_timeout)
            except TimeoutError:
                raise HubUnavailable("Redis did not confirm the subscription") from None
            yield sub
        finally:
            chan.subs.discard(sub)
            if not chan.subs and self._channels.get(name) is chan:
                del self._channels[name]
                await chan.upstream.unsubscribe(name)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        raw_name = message["channel"]
        name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        chan = self._channels.get(name)
        if chan is None:
            return
        if kind in ("message", "smessage"):
            frame = parse_message(message["data"])
            for sub in chan.subs:
                if not sub.offer(frame):
                    self.overflows += 1
                    self._on_overflow()
        elif kind in ("subscribe", "ssubscribe"):
            if chan.outstanding > 0:
                chan.outstanding -= 1
            if chan.outstanding > 0:
                return
            if chan.ready.is_set():
                # Confirmed again with nothing outstanding: redis-py resubscribed after a
                # reconnect, so live messages may have been lost meanwhile.
                for sub in chan.subs:
                    sub.request_resync()
            else:
                chan.ready.set()
