"""One Redis pub/sub connection per process, fanned out to local subscribers."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from server import redis_keys
from server.fanout.ring import DEFAULT_QUEUE_BYTES, Channel, Subscription
from server.fanout.upstream import Upstream, parse_block, parse_messages
from server.redis_client import AnyRedis
from server.throttle import Throttle

logger = logging.getLogger(__name__)
_throttle = Throttle(logger)


class HubUnavailable(Exception):
    """No Redis node carries the workflow's channel now (a cluster slot without owner)."""


# A cluster slot map that names no node for a key (mid-failover, or a node that is gone).
NO_OWNER = (RedisError, RedisClusterException)


# What a cluster node's connection settings may carry over to a plain client.
_CONN_KWARGS = {
    "host",
    "port",
    "username",
    "password",
    "db",
    "ssl",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "socket_timeout",
    "socket_connect_timeout",
    "client_name",
}


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
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        on_reconnect: Callable[[], None] | None = None,
        on_overflow: Callable[[], None] | None = None,
        on_state: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self._redis = redis
        # What an append wrote to the progress hash (a live message starting with `=`):
        # for the store's cached fold state (store.Store.follow), not for the streams.
        self._on_state = on_state or (lambda workflow_id, message: None)
        self._queue_limit = queue_limit
        self._queue_bytes = queue_bytes
        self._on_reconnect = on_reconnect or (lambda: None)
        self._on_overflow = on_overflow or (lambda: None)
        self._channels: dict[str, Channel] = {}
        self._control = redis_keys.hub_control_channel(os.getpid(), id(self))
        self._cluster = isinstance(redis, RedisCluster)
        self._upstreams: dict[str, Upstream] = {}
        self.overflows = 0  # subscribers that fell behind and were sent to catch up

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    @property
    def redis_down(self) -> bool:
        """A pub/sub connection failed and is not back: Redis is unavailable (not merely
        slow), which a new stream is told with a 503."""
        return any(upstream.down for upstream in self._upstreams.values())

    @property
    def connection_count(self) -> int:
        """Pub/sub connections held: one, or one per cluster shard that carries a channel."""
        return len(self._upstreams)

    def queued_events(self) -> int:
        """Live events held for local readers right now (bounded by design)."""
        return sum(chan.ring_events for chan in self._channels.values())

    def queued_bytes(self) -> int:
        """Frame.size of the live frames held right now (CLIENT_QUEUE_BYTES per channel,
        plus at most one frame)."""
        return sum(chan.ring_bytes for chan in self._channels.values())

    def max_queue(self) -> int:
        """The most live events held for one channel right now (at most the queue limit,
        or one block of the append script's)."""
        return max((chan.ring_events for chan in self._channels.values()), default=0)

    def _overflowed(self) -> None:
        self.overflows += 1
        self._on_overflow()

    async def start(self) -> None:
        if not self._cluster:
            self._upstream_for("")  # connect now: /readyz and the first stream find it ready

    async def close(self) -> None:
        for upstream in list(self._upstreams.values()):
            await upstream.close()
        self._upstreams.clear()

    def _upstream_for(self, channel: str) -> Upstream:
        """The connection that carries `channel`: the shard's primary on a cluster."""
        if not self._cluster:
            key, make, sharded = "redis", lambda: self._redis, False
        else:
            cluster: Any = self._redis
            node = cluster.get_node_from_key(channel)
            key, sharded = node.name, True

            def make() -> Redis:
                kwargs = {k: v for k, v in node.connection_kwargs.items() if k in _CONN_KWARGS}
                # No retries inside redis-py: a dead node's connect would be retried with
                # backoff for seconds before the reader may look at the slot map again.
                return Redis(**kwargs, retry=Retry(NoBackoff(), 0))

        upstream = self._upstreams.get(key)
        if upstream is None:
            upstream = self._upstreams[key] = Upstream(self, key, make, sharded)
            upstream.start()
        return upstream

    async def _rehome(self, failed: Upstream) -> bool:
        """After `failed`'s connection broke (a cluster only): re-read the slot map and move
        each of its channels to the primary that owns the channel's slot now. The streams
        of a moved channel catch up from Redis once the new node confirms it (see
        _dispatch), so nothing published meanwhile is lost. True when `failed` carries
        nothing any more."""
        cluster: Any = self._redis
        try:
            await cluster.nodes_manager.initialize(last_failed_node_name=failed.name)
        except Exception as exc:  # no node answers yet: the caller retries after a pause
            logger.info("cluster slots not refreshed after losing %s: %s", failed.name, exc)
            return False
        moved = 0
        for name, chan in list(self._channels.items()):
            if chan.upstream is not failed:
                continue
            try:
                target = self._upstream_for(name)
            except NO_OWNER:  # the slot has no owner yet (mid-failover): retried later
                continue
            if target is not failed:
                chan.upstream = target
                await target.subscribe(name, chan)
                moved += 1
        if moved:
            self._on_reconnect()
            logger.info("hub moved %d channels from %s after a topology change", moved, failed.name)
        return not failed.channels()

    def down_for(self, workflow_id: str) -> bool:
        """The connection that would carry this workflow's channel failed and is not back:
        Redis is unavailable for it (not merely slow), which a new stream is told with a
        503. On a cluster only that shard counts: the others keep serving."""
        if not self._cluster:
            return self.redis_down
        name = redis_keys.channel(workflow_id)
        try:
            node: Any = self._redis.get_node_from_key(name)  # type: ignore[union-attr]
        except NO_OWNER:
            return True  # its slot has no owner right now
        chan = self._channels.get(name)
        # The slot map (refreshed by any command that met the failover) may already name the
        # promoted node while the channel still waits on the dead one: the reader moves it
        # within half a second, and the stream waits for the confirmation meanwhile.
        upstream = chan.upstream if chan is not None else self._upstreams.get(node.name)
        return upstream is not None and upstream.down and upstream.name == node.name

    async def attach(self, workflow_id: str) -> Subscription:
        """Register a reader and ask Redis for its channel. Its stream must wait for
        `sub.confirmed` before reading history (the hub wakes it then), so that nothing
        published after the read can be missed."""
        name = redis_keys.channel(workflow_id)
        chan = self._channels.get(name)
        if chan is None:
            try:
                upstream = self._upstream_for(name)
            except NO_OWNER:
                raise HubUnavailable("no Redis Cluster node owns this workflow's slot") from None
            chan = self._channels[name] = Channel(
                workflow_id, upstream, self, self._queue_limit, byte_limit=self._queue_bytes
            )
            await upstream.subscribe(name, chan)
        sub = Subscription(workflow_id, chan, chan.seq)
        chan.subs.add(sub)
        return sub

    async def detach(self, sub: Subscription) -> None:
        """Forget a reader; unsubscribe its channel after the last one."""
        chan = sub.channel
        chan.subs.discard(sub)
        name = redis_keys.channel(sub.workflow_id)
        if not chan.subs and self._channels.get(name) is chan:
            del self._channels[name]
            await chan.upstream.unsubscribe(name)

    def _deliver(self, raw_name: bytes, data: bytes, upstream: Upstream) -> int:
        """A live message (the common case, without PubSub's dict); the events pushed."""
        chan = self._channels.get(raw_name.decode())
        if chan is None or chan.upstream is not upstream:
            return 0
        if data[:1] == b"=":
            self._on_state(chan.workflow_id, data)
            return 0
        try:
            if data[:1] == b"#":
                frames = [parse_block(data)]
            else:  # a shard's overview notices, or what an older writer published
                frames = parse_messages(data)
        except ValueError:
            # A format this version does not read (a newer writer during a rolling
            # upgrade): its streams read the events from Redis, and the connection stays
            # (dropping it would resync every channel on it and refuse new streams).
            _throttle(
                logging.WARNING, "unknown", "live message not understood on %s", chan.workflow_id
            )
            for sub in chan.subs:
                sub.request_resync()
            return 0
        for frame in frames:
            chan.push(frame)
        return sum(frame.count for frame in frames)

    def _dispatch(self, message: dict[str, Any], upstream: Upstream) -> None:
        kind = message["type"]
        raw_name = message["channel"]
        name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        chan = self._channels.get(name)
        if chan is None or chan.upstream is not upstream:
            return  # not wanted any more, or moved to another node (cluster failover)
        if kind in ("message", "smessage"):
            self._deliver(
                raw_name if isinstance(raw_name, bytes) else name.encode(),
                message["data"],
                upstream,
            )
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
                for sub in chan.subs:
                    sub.wakeup.set()  # streams wait for this before reading history
