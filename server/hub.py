"""One Redis pub/sub connection per process, fanned out to local subscribers."""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from . import sse, store
from .store import AnyRedis
from .throttle import Throttle

logger = logging.getLogger(__name__)
_throttle = Throttle(logger)


class HubUnavailable(Exception):
    """No Redis node carries the workflow's channel now (a cluster slot without owner)."""


DEFAULT_QUEUE_BYTES = 16 * 1024 * 1024  # CLIENT_QUEUE_BYTES' default
# The hub's reader yields to the event loop after this many live frames in a row.
YIELD_FRAMES = 256

# A cluster slot map that names no node for a key (mid-failover, or a node that is gone).
NO_OWNER = (RedisError, RedisClusterException)


class Frame:
    """A live event, encoded once per process and shared by every local subscriber."""

    __slots__ = ("_ws", "data", "id", "json", "key", "terminal")

    def __init__(
        self, key: tuple[int, int], id: str, data: bytes, json: bytes, terminal: bool
    ) -> None:
        self.key = key
        self.id = id
        self.data = data  # the SSE frame
        self.json = json  # the stored event, UTF-8 JSON
        self.terminal = terminal
        self._ws: str | None = None

    @property
    def ws(self) -> str:
        """The WebSocket text message (the event object with its `id`), made on first use:
        most processes serve SSE only, and this costs a decode and a copy per event."""
        if self._ws is None:
            self._ws = ws_text(self.id, self.json.decode())
        return self._ws

    @property
    def size(self) -> int:
        """What holding this frame costs, roughly: the SSE frame and its WebSocket text."""
        return 2 * len(self.data)


def ws_text(event_id: str, data: str) -> str:
    """The stored event JSON (an object) with `"id"` first: what a WebSocket client gets."""
    return '{"id":"' + event_id + '",' + data[1:] if data != "{}" else '{"id":"' + event_id + '"}'


class Wakeup:
    """Wakes one waiting task. Cheaper than asyncio.Event (no deque of waiters per stream):
    a stream has exactly one waiter, and the hub sets it once per message per stream."""

    __slots__ = ("_fut", "flag")

    def __init__(self) -> None:
        self.flag = False
        self._fut: asyncio.Future[None] | None = None

    def set(self) -> None:
        if not self.flag:
            self.flag = True
            fut, self._fut = self._fut, None
            if fut is not None and not fut.done():
                fut.set_result(None)

    def clear(self) -> None:
        self.flag = False

    def waiter(self) -> asyncio.Future[None]:
        """A future the next set() resolves: awaited directly, it costs no coroutine frame
        per waiting stream. Check for work (and the flag) before awaiting it."""
        fut = self._fut = asyncio.get_running_loop().create_future()
        return fut

    async def wait(self) -> None:
        if not self.flag:
            await self.waiter()


class DirectWriter(Protocol):
    """A stream parked between events, which the hub may write to without waking it."""

    def write_now(self, live: Live, now: float) -> bool:
        """Write `live` at once (`now`: the loop's clock), or return False to hand it to
        the stream's own task."""


@dataclass(eq=False, slots=True)
class Live:
    """Live frames taken in one go; shared by every reader at the same position, so the
    frames are joined into one SSE write once per position, not once per stream."""

    start: int  # channel sequence of frames[0]
    end: int  # the channel sequence when this was built: valid while nothing newer came
    frames: list[Frame]
    terminal: bool  # frames end with a terminal event (the stream ends after it)
    stop: int = field(init=False)  # the position after the last frame
    _sse: bytes | None = None
    _chunk: bytes | None = None

    def __post_init__(self) -> None:
        self.stop = self.start + len(self.frames)

    def after(self, key: tuple[int, int]) -> Live | None:
        """These frames without those at or below `key` (sent from history already)."""
        n, frames = 0, self.frames
        while n < len(frames) and frames[n].key <= key:
            n += 1
        if n == 0:
            return self
        if n == len(frames):
            return None
        return Live(self.start + n, self.end, frames[n:], self.terminal)

    @property
    def sse(self) -> bytes:
        if self._sse is None:
            self._sse = b"".join(f.data for f in self.frames)
        return self._sse

    @property
    def chunk(self) -> bytes:
        """`sse` as one HTTP/1.1 chunk (chunked transfer encoding), for direct writes."""
        if self._chunk is None:
            sse = self.sse
            self._chunk = b"%x\r\n%b\r\n" % (len(sse), sse)
        return self._chunk


@dataclass(eq=False, slots=True)
class Subscription:
    """One open stream's place in its channel's live ring, plus a flag asking for catch-up."""

    workflow_id: str
    channel: _Channel
    cursor: int  # channel sequence of the next live frame this reader takes
    wakeup: Wakeup = field(default_factory=Wakeup)
    # Set when live frames were lost to this reader (it fell out of the ring, or Redis
    # reconnected): it must re-read the stream after its last sent id. Cleared by restart().
    resync: bool = False
    # Only "something changed" matters (a progress stream): holds no frames in the ring.
    notify_only: bool = False
    # Set while the stream waits with nothing to resend: the hub writes live frames to it
    # directly, without waking its task (a wake-up per event per stream is most of the cost
    # of a broadcast). Cleared by whichever side hands the work back to the task.
    direct: DirectWriter | None = None

    @property
    def pending(self) -> bool:
        return self.cursor < self.channel.seq

    @property
    def confirmed(self) -> bool:
        """Redis confirmed the channel: live frames flow from here on."""
        return self.channel.ready.is_set()

    def restart(self) -> None:
        """Start a catch-up read: live frames from now on are kept for this reader."""
        self.resync = False
        self.cursor = self.channel.seq

    def take(self) -> Live | None:
        """Live frames after this reader's position (through the first terminal one); None
        when there are none, or when it fell behind the ring (then `resync` is set)."""
        chan = self.channel
        if self.resync or self.cursor >= chan.seq:
            return None
        live = chan.since(self.cursor)
        if live is None:  # what it missed left the ring: the stream in Redis still has it
            chan.hub._overflowed()
            self.request_resync()
            return None
        self.cursor = live.stop
        return live

    def first_writes(self, live: Live) -> list[Frame]:
        """Frames of `live` no stream of this process has written yet (for the delay metric)."""
        chan = self.channel
        if live.stop <= chan.written:
            return []
        start, chan.written = max(live.start, chan.written), live.stop
        return live.frames[start - live.start :]

    def request_resync(self) -> None:
        self.resync = True
        self.wakeup.set()


@dataclass(eq=False)
class _Channel:
    """One subscribed workflow: its readers and a ring of the live frames some still need."""

    workflow_id: str
    upstream: _Upstream
    hub: Hub
    limit: int  # frames a reader may fall behind before it is sent to catch up
    subs: set[Subscription] = field(default_factory=set)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    outstanding: int = 0  # SUBSCRIBEs sent and not yet confirmed
    ring: deque[Frame] = field(default_factory=deque)
    ring_bytes: int = 0  # Frame.size summed over the ring
    byte_limit: int = DEFAULT_QUEUE_BYTES  # `limit` in bytes: large events fill it sooner
    seq: int = 0  # sequence of the next frame; the ring holds base .. seq - 1
    terminal_seq: int = -1  # sequence of the newest terminal frame
    written: int = 0  # frames before this were written to some client already
    cached: Live | None = None
    flush_due: bool = False  # a flush() for direct writers is scheduled

    @property
    def base(self) -> int:
        return self.seq - len(self.ring)

    def push(self, frame: Frame) -> None:
        """Add a live frame; readers hear of it in flush(), once per event-loop pass."""
        ring, seq, size = self.ring, self.seq, frame.size
        if len(ring) >= self.limit or self.ring_bytes + size > self.byte_limit:
            if self.flush_due:
                # A burst bigger than the ring within one loop pass (a group commit of 1,000
                # events): hand the parked streams what came so far now, rather than send
                # them all to catch up from Redis, one read each.
                self.flush()
            self._trim()
            if ring and (len(ring) >= self.limit or self.ring_bytes + size > self.byte_limit):
                # The slowest readers are a whole ring behind: they catch up from Redis.
                # The newest frame is always kept, however large: live readers need it.
                while ring and (
                    len(ring) >= self.limit or self.ring_bytes + size > self.byte_limit
                ):
                    self.ring_bytes -= ring.popleft().size
                kept_from = seq - len(ring)
                for sub in self.subs:
                    if sub.cursor < kept_from and not (sub.resync or sub.notify_only):
                        self.hub._overflowed()
                        sub.request_resync()
        ring.append(frame)
        self.ring_bytes += size
        if frame.terminal:
            self.terminal_seq = seq
        self.seq = seq + 1
        if not self.flush_due:
            # Once per loop pass: frames that arrived together go out in one write, and each
            # reader is visited once however many frames came (a batch is 100s of frames).
            self.flush_due = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write new live frames to every stream parked in direct mode; wake the others.

        A stream that cannot take them now (a full socket buffer, a closing connection, a
        terminal frame, frames gone from the ring, a pending resync) goes back to its task,
        which writes with back-pressure or catches up from Redis.
        """
        self.flush_due = False
        seq, now = self.seq, asyncio.get_running_loop().time()
        for sub in self.subs:  # write_now() never attaches or detaches
            out = sub.direct
            if out is None:
                sub.wakeup.set()
            elif sub.cursor < seq:
                live = None if sub.resync else self.since(sub.cursor)
                if live is not None and out.write_now(live, now):
                    sub.cursor = live.stop
                else:
                    sub.direct = None
                    sub.wakeup.set()
        self._trim()

    def _trim(self) -> None:
        """Forget the frames every reader has taken: they die young instead of lingering
        until the next event, scanned by the garbage collector meanwhile."""
        ring, seq = self.ring, self.seq
        base = seq - len(ring)
        low = seq
        for sub in self.subs:
            if base <= sub.cursor < low and not (sub.resync or sub.notify_only):
                low = sub.cursor
        if low == seq:
            ring.clear()
            self.ring_bytes = 0
            self.cached = None
        else:
            for _ in range(low - base):
                self.ring_bytes -= ring.popleft().size

    def since(self, cursor: int) -> Live | None:
        """Frames from `cursor` on (None if they left the ring), cut after a terminal one."""
        base = self.seq - len(self.ring)
        if cursor < base:
            return None
        cached = self.cached
        if cached is not None and cached.start == cursor and cached.end == self.seq:
            return cached
        frames = list(islice(self.ring, cursor - base, None))
        terminal = False
        if self.terminal_seq >= cursor:
            for i, frame in enumerate(frames):
                if frame.terminal:
                    frames, terminal = frames[: i + 1], True
                    break
        live = self.cached = Live(cursor, self.seq, frames, terminal)
        return live


def parse_message(payload: bytes) -> Frame:
    """`<id> <event_type> <terminal> <json>` (as the append script publishes) -> Frame."""
    raw_id, event_type, terminal, raw = payload.split(b" ", 3)
    event_id = raw_id.decode()
    frame = sse.encode_event(raw_id, event_type, raw)
    return Frame(store.id_key(event_id), event_id, frame, raw, terminal == b"1")


def parse_messages(payload: bytes) -> list[Frame]:
    """A live message: one event per line, in stored order (see store.APPEND_LUA).

    parse_message() per line, inlined: every process pays this for every event of the
    workflows it streams (a third less per event). The ids are the stream's own."""
    frames = []
    for line in payload.split(b"\n"):
        raw_id, event_type, terminal, raw = line.split(b" ", 3)
        if b"\r" in raw or b"\x00" in raw_id or b"\x00" in event_type:
            frames.append(parse_message(line))  # sse.encode_event's slow path
            continue
        ms, _, seq = raw_id.partition(b"-")
        frame = b"id: %b\nevent: %b\ndata: %b\n\n" % (raw_id, event_type, raw)
        key = (int(ms), int(seq))
        frames.append(Frame(key, raw_id.decode(), frame, raw, terminal == b"1"))
    return frames


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
        self.down = False  # the connection failed and is not back yet

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
            self.pubsub = self.client.pubsub(push_handler_func=_as_received)
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
                    self.down = False
                await self._read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection loss and any parser surprise: reconnect
                # Retried twice a second while Redis is away: one line per 10 s, cut short
                # (redis-py's errors may quote a whole client's repr).
                _throttle(
                    logging.WARNING, f"lost {self.name}",
                    "hub lost Redis %s (%s: %.300s); retrying in %.2fs",
                    self.name, type(exc).__name__, exc, backoff,
                )  # fmt: skip
                self.down = True
                await self._drop()
                # On a cluster the node may be gone for good (its replica promoted): move
                # the channels to whichever primary owns their slots now, and stop if none
                # is left here (reconnecting to a dead node would hold them forever).
                if self.sharded and await self.hub._rehome(self):
                    await self._retire()
                    return
                await asyncio.sleep(backoff)
                # At least twice a second: a promoted replica (Cluster, Sentinel) is ready
                # within seconds, and new streams get 503 until the hub is back. One
                # connection attempt per process per half second costs Redis nothing.
                backoff = min(backoff * 2, 0.5)

    async def _read(self) -> None:
        """Deliver what the connection says until it fails.

        Messages are read off the connection directly rather than through
        PubSub.get_message(), which per message runs a health check, a retry wrapper,
        telemetry hooks and a dict build: twice the hub's own cost per event, paid once per
        process, so it is what a second worker adds. Everything else (confirmations,
        unsubscribes) still goes through PubSub.handle_message(), which keeps its books.
        """
        pubsub, hub = self.pubsub, self.hub
        read = pubsub.connection.read_response
        unflushed = 0
        while True:
            response = await read(timeout=math.inf, disconnect_on_error=False, push_request=True)
            if isinstance(response, list) and response[0] in _MESSAGE_KINDS:
                unflushed += hub._deliver(response[1], response[2], self)
                if unflushed >= YIELD_FRAMES:
                    # Messages already buffered are read without yielding: let the streams
                    # take these first, so a backlog waits in the socket, not in the ring.
                    unflushed = 0
                    await asyncio.sleep(0)
                continue
            message = await pubsub.handle_message(response)
            if message is not None:
                hub._dispatch(message, self)

    async def _retire(self) -> None:
        """Leave the hub: this node no longer carries any of its channels."""
        if self.hub._upstreams.get(self.name) is self:
            del self.hub._upstreams[self.name]
        if self.client is not None:
            with suppress(Exception):
                await self.client.aclose()
        logger.info("hub left Redis %s: its channels moved to the new owners", self.name)


_MESSAGE_KINDS = (b"message", b"smessage")


async def _as_received(response: Any) -> Any:
    """RESP3 push handler: the message as it came (redis-py's default logs each one at
    debug level, formatting it first whatever the level)."""
    return response


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
    def redis_down(self) -> bool:
        """A pub/sub connection failed and is not back: Redis is unavailable (not merely
        slow), which a new stream is told with a 503."""
        return any(upstream.down for upstream in self._upstreams.values())

    @property
    def connection_count(self) -> int:
        """Pub/sub connections held: one, or one per cluster shard that carries a channel."""
        return len(self._upstreams)

    def queued_frames(self) -> int:
        """Live frames held for local readers right now (bounded by design)."""
        return sum(len(chan.ring) for chan in self._channels.values())

    def queued_bytes(self) -> int:
        """Frame.size of the live frames held right now (CLIENT_QUEUE_BYTES per channel,
        plus at most one frame)."""
        return sum(chan.ring_bytes for chan in self._channels.values())

    def max_queue(self) -> int:
        """The most live frames held for one channel right now (at most the queue limit)."""
        return max((len(chan.ring) for chan in self._channels.values()), default=0)

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
                # No retries inside redis-py: a dead node's connect would be retried with
                # backoff for seconds before the reader may look at the slot map again.
                return Redis(**kwargs, retry=Retry(NoBackoff(), 0))

        upstream = self._upstreams.get(key)
        if upstream is None:
            upstream = self._upstreams[key] = _Upstream(self, key, make, sharded)
            upstream.start()
        return upstream

    async def _rehome(self, failed: _Upstream) -> bool:
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
            self.reconnects += 1
            self._on_reconnect()
            logger.info("hub moved %d channels from %s after a topology change", moved, failed.name)
        return not failed.channels()

    def down_for(self, workflow_id: str) -> bool:
        """The connection that would carry this workflow's channel failed and is not back:
        Redis is unavailable for it (not merely slow), which a new stream is told with a
        503. On a cluster only that shard counts: the others keep serving."""
        if not self._cluster:
            return self.redis_down
        name = store.channel(workflow_id)
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
        name = store.channel(workflow_id)
        chan = self._channels.get(name)
        if chan is None:
            try:
                upstream = self._upstream_for(name)
            except NO_OWNER:
                raise HubUnavailable("no Redis Cluster node owns this workflow's slot") from None
            chan = self._channels[name] = _Channel(
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
        name = store.channel(sub.workflow_id)
        if not chan.subs and self._channels.get(name) is chan:
            del self._channels[name]
            await chan.upstream.unsubscribe(name)

    def _deliver(self, raw_name: bytes, data: bytes, upstream: _Upstream) -> int:
        """A live message (the common case, without PubSub's dict); the frames pushed."""
        chan = self._channels.get(raw_name.decode())
        if chan is None or chan.upstream is not upstream:
            return 0
        if data[:1] == b"=":
            self._on_state(chan.workflow_id, data)
            return 0
        frames = parse_messages(data)
        for frame in frames:
            chan.push(frame)
        return len(frames)

    def _dispatch(self, message: dict[str, Any], upstream: _Upstream) -> None:
        kind = message["type"]
        raw_name = message["channel"]
        name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        chan = self._channels.get(name)
        if chan is None or chan.upstream is not upstream:
            return  # not wanted any more, or moved to another node (cluster failover)
        if kind in ("message", "smessage"):
            self._deliver(raw_name if isinstance(raw_name, bytes) else name.encode(),
                          message["data"], upstream)  # fmt: skip
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
