"""One pub/sub connection to Redis and its reader: it turns each published message into
frames and pushes them into the channels' rings.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from server import sse, store
from server.fanout.ring import Channel, Frame
from server.tasks import stop
from server.throttle import Throttle

if TYPE_CHECKING:
    from server.fanout.hub import Hub

logger = logging.getLogger(__name__)
_throttle = Throttle(logger)


# The hub's reader yields to the event loop after this many live frames in a row.
YIELD_FRAMES = 256


def parse_block(payload: bytes) -> Frame:
    """`#<first id> <last id> <count> <terminal>` and a line break, then the events' SSE
    frames (as the append script publishes them) -> one Frame, whatever the count."""
    head, _, data = payload.partition(b"\n")
    first, last, count, terminal = head[1:].split(b" ")
    first_ms, _, first_seq = first.partition(b"-")
    last_id = last.decode()
    ms, _, seq = last_id.partition("-")
    return Frame(
        (int(ms), int(seq)),
        last_id,
        data,
        None,
        terminal == b"1",
        first=(int(first_ms), int(first_seq)),
        count=int(count),
    )


def parse_message(payload: bytes) -> Frame:
    """`<id> <event_type> <terminal> <json>` (as the append script publishes) -> Frame."""
    raw_id, event_type, terminal, raw = payload.split(b" ", 3)
    event_id = raw_id.decode()
    frame = sse.encode_event(raw_id, event_type, raw)
    return Frame(store.id_key(event_id), event_id, frame, raw, terminal == b"1")


def parse_messages(payload: bytes) -> list[Frame]:
    """A message of one event per line, in stored order: a shard's overview notices
    (server/overview/runs.py), and what an append script of a version before blocks
    (parse_block) published, which a rolling upgrade may still meet.

    parse_message() per line, inlined. The ids are the stream's own."""
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


class Upstream:
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
        await stop([self.task], what=f"hub reader {self.name}")
        await self._drop()
        if self.client is not None and self.client is not self.hub._redis:
            with suppress(Exception):
                await self.client.aclose()

    async def subscribe(self, name: str, chan: Channel) -> None:
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
                    logging.WARNING,
                    f"lost {self.name}",
                    "hub lost Redis %s (%s: %.300s); retrying in %.2fs",
                    self.name,
                    type(exc).__name__,
                    exc,
                    backoff,
                )
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
