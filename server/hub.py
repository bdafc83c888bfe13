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

from redis.exceptions import RedisError

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
    subs: set[Subscription] = field(default_factory=set)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    outstanding: int = 0  # SUBSCRIBEs sent and not yet confirmed


def parse_message(payload: bytes) -> Frame:
    """`<id> <event_type> <terminal> <json>` (as the append script publishes) -> Frame."""
    raw_id, event_type, terminal, raw = payload.split(b" ", 3)
    event_id, data = raw_id.decode(), raw.decode()
    frame = sse.encode(data, id=event_id, event=event_type.decode())
    return Frame(store.id_key(event_id), event_id, frame, ws_text(event_id, data), terminal == b"1")


class Hub:
    """Subscribes to a workflow's channel on its first local client, unsubscribes after the last."""

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
        # A private channel keeps the connection in subscribed mode even with no clients,
        # so the reader can block on it (PubSub returns at once when nothing is subscribed).
        self._control = f"wfsse:hub:{os.getpid()}:{id(self)}"
        self._pubsub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        # Serialises SUBSCRIBE/UNSUBSCRIBE so two tasks never open the pub/sub connection twice.
        self._lock = asyncio.Lock()
        self.reconnects = 0
        self.overflows = 0  # subscribers that fell behind and were sent to catch up

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    def queued_frames(self) -> int:
        """Live frames held for local subscribers right now (bounded by design)."""
        return sum(len(sub.queue) for chan in self._channels.values() for sub in chan.subs)

    def max_queue(self) -> int:
        """The longest subscriber queue right now."""
        return max((len(s.queue) for c in self._channels.values() for s in c.subs), default=0)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="hub-reader")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        await self._drop_connection()

    @asynccontextmanager
    async def subscribe(self, workflow_id: str) -> AsyncIterator[Subscription]:
        """Register a subscriber; returns once Redis confirmed the channel is subscribed."""
        name = store.channel(workflow_id)
        sub = Subscription(workflow_id, self._queue_limit)
        chan = self._channels.get(name)
        if chan is None:
            chan = self._channels[name] = _Channel(workflow_id)
            await self._send_subscribe(name, chan)
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
                await self._send_unsubscribe(name)

    async def _send_subscribe(self, name: str, chan: _Channel) -> None:
        async with self._lock:
            if self._pubsub is None:
                return  # the reader subscribes every wanted channel when it reconnects
            chan.outstanding += 1
            try:
                await self._pubsub.subscribe(name)
            except (RedisError, OSError) as exc:
                logger.warning("subscribe %s failed (%s); retried on reconnect", name, exc)

    async def _send_unsubscribe(self, name: str) -> None:
        async with self._lock:
            if self._pubsub is None:
                return
            try:
                await self._pubsub.unsubscribe(name)
            except (RedisError, OSError) as exc:
                logger.warning("unsubscribe %s failed: %s", name, exc)

    async def _drop_connection(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self._connected.clear()
        if pubsub is not None:
            with suppress(Exception):
                await pubsub.aclose()

    async def _connect(self) -> None:
        async with self._lock:
            self._pubsub = self._redis.pubsub()
            names = list(self._channels)
            for name in names:
                self._channels[name].outstanding = 1
            await self._pubsub.subscribe(self._control, *names)
        self._connected.set()

    async def _run(self) -> None:
        backoff = 0.05
        first = True
        while True:
            try:
                if self._pubsub is None:
                    await self._connect()
                    if not first:
                        self.reconnects += 1
                        self._on_reconnect()
                        logger.info("hub reconnected to Redis (%d channels)", len(self._channels))
                    first = False
                    backoff = 0.05
                message = await self._pubsub.get_message(timeout=None)
                if message is not None:
                    self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection loss and any parser surprise: reconnect
                logger.warning(
                    "hub lost Redis (%s: %s); retrying in %.2fs", type(exc).__name__, exc, backoff
                )
                await self._drop_connection()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

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
