"""One open event stream: replay after an id, then live, gap-free across the hand-over."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from redis.exceptions import RedisError

from server import sse
from server.fanout.ring import Frame, Live, Subscription, Wakeup
from server.store import Entry, Page, Store, id_key
from server.streams.registry import StreamHandle

if TYPE_CHECKING:
    from server import wire

logger = logging.getLogger(__name__)

PAGE = 500  # events per history read: bounds memory of a catch-up
CONFIRM_GRACE_SECONDS = 3.0  # the longest a stream's history waits for SUBSCRIBE's answer
LAST_KEY = (2**64 - 1, 2**64 - 1)  # the largest stream id Redis can hold
WRITE_BUFFER_LIMIT = 64 * 1024  # bytes a direct write may leave queued for a slow client
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

ProgressFn = Callable[[str], Awaitable["wire.Progress | None"]]


class Heartbeat:
    """Wakes a stream once nothing was written to it for `interval` seconds.

    One timer per stream, re-armed at most once per interval: arming and cancelling a
    timeout around every wait would cost a timer per event per stream.
    """

    __slots__ = ("_timer", "due", "interval", "last_write", "loop", "wakeup")

    def __init__(self, wakeup: Wakeup, interval: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.wakeup = wakeup
        self.interval = interval
        self.last_write = self.loop.time()
        self.due = False
        self._timer = self.loop.call_at(self.last_write + interval, self._fire)

    def wrote(self, now: float | None = None) -> None:
        self.last_write = self.loop.time() if now is None else now
        self.due = False

    def _fire(self) -> None:
        now = self.loop.time()
        deadline = self.last_write + self.interval
        if now + 0.001 >= deadline:  # the loop may run a timer a hair early
            self.due = True
            self.wakeup.set()
            deadline = now + self.interval
        self._timer = self.loop.call_at(deadline, self._fire)

    def cancel(self) -> None:
        self._timer.cancel()


async def wait_for_wakeup(sub: Subscription, handle: StreamHandle, beat: Heartbeat) -> bool:
    """Wait until the hub (or shutdown) wakes `sub`; False when the heartbeat fell due."""
    sub.wakeup.clear()
    if not (sub.pending or sub.resync or handle.stopping or beat.due):
        await sub.wakeup.wait()  # the wake-up came after the check: nothing is lost
    return not beat.due


class ClientGone(Exception):
    """The client closed the connection."""


class Sink(Protocol):
    """How one client receives events: SSE frames on a response, or WebSocket messages."""

    direct: bool  # write_now() can write live frames without the stream's task

    def entry(self, entry: Entry) -> Any:
        """Encode a history entry (per client: replay is per client anyway)."""

    async def send(self, chunk: list[Any]) -> None:
        """Write encoded history events; raises ClientGone when the client left."""

    async def send_live(self, live: Live) -> None:
        """Write live frames in their shared encoding (made once per process by the hub)."""

    def write_now(self, live: Live) -> bool:
        """Write live frames synchronously if the connection takes them without waiting."""

    async def gap(self, payload: wire.Gap) -> None:
        """Announce trimmed history."""

    async def keep_alive(self) -> None:
        """Nothing was sent for a while."""

    async def goodbye(self, retry_ms: int) -> None:
        """The server is shutting down: tell the client when to come back."""


class SseSink:
    """SSE frames on a prepared StreamResponse."""

    __slots__ = ("chunked", "response", "transport")
    direct = True

    def __init__(self, response: web.StreamResponse, transport: asyncio.Transport) -> None:
        self.response = response
        self.transport = transport
        self.chunked = response.chunked

    def entry(self, entry: Entry) -> bytes:
        return entry.sse

    async def write(self, data: bytes) -> None:
        try:
            await self.response.write(data)
        except (ConnectionResetError, ConnectionError, RuntimeError) as exc:
            raise ClientGone from exc

    async def send(self, chunk: list[bytes]) -> None:
        await self.write(b"".join(chunk))  # several frames, one write

    async def send_live(self, live: Live) -> None:
        await self.write(live.sse)  # joined once for every stream at this position

    def write_now(self, live: Live) -> bool:
        # Straight to the transport, framed once per position: aiohttp's writer would frame
        # the chunk per stream. Past the transport's high-water mark the stream's task
        # takes over and waits for the client to drain.
        transport = self.transport
        if transport.is_closing() or transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            return False
        transport.write(live.chunk if self.chunked else live.sse)
        return True

    async def gap(self, payload: wire.Gap) -> None:
        await self.write(sse.encode(json.dumps(payload, ensure_ascii=False), event="gap"))

    async def keep_alive(self) -> None:
        await self.write(sse.KEEP_ALIVE)

    async def goodbye(self, retry_ms: int) -> None:
        await self.write(sse.encode(retry=retry_ms))


class EventStream:
    """Sends one workflow's events to one client: history first, then live, no gap."""

    __slots__ = (
        "beat",
        "check_finished",
        "fresh",
        "handle",
        "heartbeat",
        "last_id",
        "last_key",
        "on_gap",
        "on_live",
        "on_sent",
        "progress",
        "read_once",
        "sent_id",
        "sink",
        "store",
        "sub",
        "workflow_id",
    )

    def __init__(
        self,
        sink: Sink,
        store: Store,
        sub: Subscription,
        *,
        start: str | None,
        heartbeat: float,
        handle: StreamHandle,
        progress: ProgressFn,
        on_sent: Callable[[int], None] = lambda n: None,
        on_gap: Callable[[], None] = lambda: None,
        on_live: Callable[[list[Frame]], None] = lambda frames: None,
        check_finished: bool = False,
    ) -> None:
        self.sink = sink
        self.store = store
        self.sub = sub
        self.workflow_id = sub.workflow_id
        self.last_id = start
        self.last_key = id_key(start) if start else (0, 0)
        self.heartbeat = heartbeat
        self.handle = handle
        self.progress = progress
        self.on_sent = on_sent
        self.on_gap = on_gap
        self.on_live = on_live
        self.read_once = False
        self.sent_id: str | None = None  # the newest id this stream sent (not the client's)
        self.check_finished = check_finished
        handle.wakeup = sub.wakeup

    async def run(self) -> None:
        """Stream until the terminal event, the client leaving, or shutdown."""
        # One flat loop, no helper coroutines: each nested frame is memory per open stream.
        sub, handle = self.sub, self.handle
        beat = self.beat = Heartbeat(sub.wakeup, self.heartbeat)
        sub.resync = True
        backoff = 0.1
        self.fresh = True  # live frames need no comparison with what was sent
        direct = self.sink.direct
        # A SUBSCRIBE confirmation can come late (a loaded hub or Redis). The history does
        # not wait for it longer than CONFIRM_GRACE_SECONDS: it is read without it, and read
        # again after the last id sent once the confirmation comes, since events stored
        # in between reached no live channel.
        loop = asyncio.get_running_loop()
        grace_at = loop.time() + CONFIRM_GRACE_SECONDS
        grace = None if sub.confirmed else loop.call_at(grace_at, sub.wakeup.set)
        early = False  # history was read before the confirmation
        try:
            while not handle.stopping:
                if early and sub.confirmed:
                    early, sub.resync = False, True
                if sub.resync and (sub.confirmed or loop.time() >= grace_at):
                    early = early or not sub.confirmed
                    sub.restart()
                    try:
                        if await self._catch_up() or await self._finished_already():
                            return
                        backoff = 0.1
                    except RedisError as exc:
                        # Redis is down: keep the client, retry the read; the hub resyncs us.
                        logger.info("catch-up of %s failed (%s); retrying", self.workflow_id, exc)
                        # A plain sleep: waiting on the wake-up would return at once (a resync
                        # is pending, live frames keep coming) and spin on a failing Redis.
                        await asyncio.sleep(backoff)
                        sub.resync = True
                        backoff = min(backoff * 2, 2.0)
                        continue
                    # Notifications of events the read returned may still be on their way:
                    # drop live frames up to the last sent id until a newer one shows.
                    self.fresh = False
                    beat.wrote()
                live = sub.take()
                if live is not None and not self.fresh:
                    live = live.after(self.last_key)
                    if live is None:
                        continue
                    self.fresh = True
                if live is not None:
                    await self.sink.send_live(live)
                    self._sent(live)
                    if live.terminal:
                        return
                    continue
                sub.wakeup.clear()
                ready = (
                    sub.pending
                    or (sub.resync and (sub.confirmed or loop.time() >= grace_at))
                    or (early and sub.confirmed)
                )
                if not (ready or handle.stopping or beat.due):
                    # Live frames, a resync, the confirmation, shutdown or the heartbeat.
                    # Caught up and live: the hub may write to the client meanwhile.
                    sub.direct = self if direct and not sub.resync else None
                    await sub.wakeup.waiter()  # a wake-up after the check is not lost
                    sub.direct = None
                if beat.due:
                    await self.sink.keep_alive()
                    beat.wrote()
            if handle.retry_ms is not None:
                # Shutdown: a fresh retry tells EventSource when to come back (elsewhere).
                await self.sink.goodbye(handle.retry_ms)
        except ClientGone:
            return
        finally:
            sub.direct = None
            beat.cancel()
            if grace is not None:
                grace.cancel()

    def write_now(self, live: Live, now: float) -> bool:
        """The hub's direct write while this stream waits (see Subscription.direct)."""
        if live.terminal:
            return False  # it ends the response: the task sends it
        unsent = live if self.fresh else live.after(self.last_key)
        if unsent is None:
            return True  # all sent from history already
        if not self.sink.write_now(unsent):
            return False
        self.fresh = True
        self._sent(unsent, now)
        return True

    def _sent(self, live: Live, now: float | None = None) -> None:
        self.beat.wrote(now)
        last = live.frames[-1]
        self.last_id, self.last_key = last.id, last.key
        self.sent_id = last.id
        self.on_sent(live.count)
        if first := self.sub.first_writes(live):
            self.on_live(first)

    async def _finished_already(self) -> bool:
        """Once, when the handler could not ask Redis whether to answer 204: the last event
        is terminal and the client had it, so nothing will follow."""
        if not self.check_finished:
            return False
        last = await self.store.last_entry(self.workflow_id)
        self.check_finished = False
        return last is not None and last.terminal and last.key <= self.last_key

    async def _catch_up(self) -> bool:
        """Send every retained event after the last sent id; True if the terminal was sent."""
        if self.last_key == LAST_KEY:
            return False  # nothing can follow the largest id, and Redis refuses "(" + it
        # Is the last event this stream sent still stored? Not when Redis lost it: a failover
        # to a replica it had not reached yet, a restart without persistence. The client
        # saw an event nobody else will, and a retry of it may come under a new id: that is
        # announced as a gap (read in the same snapshot, so it costs no round trip).
        verify = self.sent_id is not None and self.sent_id == self.last_id
        while True:
            page = await self.store.read_after(
                self.workflow_id, self.last_id, PAGE, inclusive=verify
            )
            if verify:
                verify = False
                stored = bool(page.entries) and page.entries[0].id == self.last_id
                if not stored and (page.trimmed is None or id_key(page.trimmed) < self.last_key):
                    await self._announce_gap(page)
                    self.sent_id = None
            if page.trimmed is not None:
                trimmed_key = id_key(page.trimmed)
                if self.last_id is None and not self.read_once:
                    # "From the beginning" means what is retained when the client asked:
                    # only what is trimmed after that is a gap.
                    self.last_id, self.last_key = page.trimmed, trimmed_key
                elif self.last_key < trimmed_key:
                    await self._announce_gap(page)
                    self.last_id, self.last_key = page.trimmed, trimmed_key
            self.read_once = True
            if await self._send_entries(page.entries):
                return True
            if len(page.entries) < PAGE:
                return False

    async def _announce_gap(self, page: Page) -> None:
        payload: wire.Gap = {
            "requested": self.last_id or "0-0",
            "earliest_available": page.entries[0].id if page.entries else None,
            "progress": await self.progress(self.workflow_id),
        }
        self.on_gap()
        await self.sink.gap(payload)

    async def _send_entries(self, entries: list[Entry]) -> bool:
        chunk: list[Any] = []
        terminal = False
        for entry in entries:
            if entry.key <= self.last_key:
                continue
            chunk.append(self.sink.entry(entry))
            self.last_id, self.last_key = entry.id, entry.key
            self.sent_id = entry.id
            if entry.terminal:
                terminal = True
                break
        if chunk:
            await self.sink.send(chunk)
            self.on_sent(len(chunk))
        return terminal
