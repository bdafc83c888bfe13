"""Live frames of a channel, encoded once per process and shared by every local
subscriber: the frame, the ring a channel keeps, and a subscriber's position in it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Protocol

from server.sse import http_chunk

if TYPE_CHECKING:
    from server.fanout.hub import Hub
    from server.fanout.upstream import Upstream


DEFAULT_QUEUE_BYTES = 16 * 1024 * 1024  # CLIENT_QUEUE_BYTES' default


class Frame:
    """Live events stored together (one append), encoded once per process and shared by
    every local subscriber: one event, or a block of them as the append script published
    it (their SSE frames joined), which costs the hub the same whatever its length. Only a
    block's last event can be terminal."""

    __slots__ = ("_events", "_ws", "count", "data", "first", "id", "json", "key", "terminal")

    def __init__(
        self,
        key: tuple[int, int],
        id: str,
        data: bytes | memoryview,
        json: bytes | memoryview | None,
        terminal: bool,
        *,
        first: tuple[int, int] | None = None,
        count: int = 1,
    ) -> None:
        self.key = key  # of the last event
        self.id = id  # of the last event
        self.data = data  # the SSE frames
        self.json = json  # the stored event, UTF-8 JSON (one event only; see events())
        self.terminal = terminal  # the last event is terminal
        self.first = key if first is None else first  # of the first event
        self.count = count
        self._ws: str | None = None
        self._events: list[Frame] | None = None

    def events(self) -> list[Frame]:
        """One frame per event: a block is split on first use (a WebSocket, an overview, a
        stream that read part of it from history); SSE streams send it whole."""
        if self.count == 1 and self.json is not None:
            return [self]
        if self._events is None:
            self._events = split_frames(self.data, self.terminal)
        return self._events

    def after(self, key: tuple[int, int]) -> Frame | None:
        """This frame without the events at or below `key` (None when nothing is left)."""
        if self.first > key:
            return self
        if self.key <= key:
            return None
        rest = [f for f in self.events() if f.key > key]
        if len(rest) == 1:
            return rest[0]
        last = rest[-1]
        data = b"".join(f.data for f in rest)
        return Frame(
            last.key, last.id, data, None, last.terminal, first=rest[0].key, count=len(rest)
        )

    @property
    def ws(self) -> str:
        """The WebSocket text message (the event object with its `id`), made on first use:
        most processes serve SSE only, and this costs a decode and a copy per event."""
        if self._ws is None:
            assert self.json is not None, "a block has one WebSocket message per event"
            self._ws = ws_text(self.id, bytes(self.json).decode())
        return self._ws

    @property
    def size(self) -> int:
        """What holding this frame costs, roughly: the SSE frames and their WebSocket text."""
        return 2 * len(self.data)


def split_frames(data: bytes | memoryview, terminal: bool) -> list[Frame]:
    """A block's SSE frames (`id:`, `event:`, one `data:` line each; stored JSON holds no
    line break) as one Frame each; `terminal`: the last one is. Their SSE bytes and JSON
    are views of the block's, not copies: the ring counts a block's bytes once."""
    whole = bytes(data)
    view = memoryview(whole)
    frames = []
    start = 0
    while start < len(whole):
        end = whole.index(b"\n\n", start) + 2
        id_end = whole.index(b"\n", start)
        event_id = whole[start + 4 : id_end].decode()  # after "id: "
        json_start = whole.index(b"\n", id_end + 1) + 7  # after "event: ...\n" and "data: "
        ms, _, seq = event_id.partition("-")
        key = (int(ms), int(seq))
        frames.append(Frame(key, event_id, view[start:end], view[json_start : end - 2], False))
        start = end
    if terminal:
        frames[-1].terminal = True
    return frames


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
    count: int = field(init=False)  # events in the frames
    _sse: bytes | None = None
    _chunk: bytes | None = None

    def __post_init__(self) -> None:
        self.stop = self.start + len(self.frames)
        self.count = sum(f.count for f in self.frames)

    def after(self, key: tuple[int, int]) -> Live | None:
        """These frames without the events at or below `key` (sent from history already)."""
        n, frames = 0, self.frames
        while n < len(frames) and frames[n].key <= key:
            n += 1
        if n == len(frames):
            return None
        if frames[n].first <= key:  # a block read partly from history
            rest = frames[n].after(key)
            assert rest is not None  # its last event is newer than `key`
            return Live(self.start + n, self.end, [rest, *frames[n + 1 :]], self.terminal)
        if n == 0:
            return self
        return Live(self.start + n, self.end, frames[n:], self.terminal)

    def events(self) -> list[Frame]:
        """The frames one per event (see Frame.events)."""
        return [event for frame in self.frames for event in frame.events()]

    @property
    def sse(self) -> bytes:
        if self._sse is None:
            self._sse = b"".join(f.data for f in self.frames)
        return self._sse

    @property
    def chunk(self) -> bytes:
        """`sse` as one HTTP/1.1 chunk (chunked transfer encoding), for direct writes."""
        if self._chunk is None:
            self._chunk = http_chunk(self.sse)
        return self._chunk


@dataclass(eq=False, slots=True)
class Subscription:
    """One open stream's place in its channel's live ring, plus a flag asking for catch-up."""

    workflow_id: str
    channel: Channel
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
class Channel:
    """One subscribed workflow: its readers and a ring of the live frames some still need."""

    workflow_id: str
    upstream: Upstream
    hub: Hub
    limit: int  # events a reader may fall behind before it is sent to catch up
    subs: set[Subscription] = field(default_factory=set)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    outstanding: int = 0  # SUBSCRIBEs sent and not yet confirmed
    ring: deque[Frame] = field(default_factory=deque)
    ring_bytes: int = 0  # Frame.size summed over the ring
    ring_events: int = 0  # Frame.count summed over the ring
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
        ring, seq, size, count = self.ring, self.seq, frame.size, frame.count
        if self._full(size, count):
            if self.flush_due:
                # A burst bigger than the ring within one loop pass (a group commit of 1,000
                # events): hand the parked streams what came so far now, rather than send
                # them all to catch up from Redis, one read each.
                self.flush()
            self._trim()
            if ring and self._full(size, count):
                # The slowest readers are a whole ring behind: they catch up from Redis.
                # The newest frame is always kept, however large: live readers need it.
                while ring and self._full(size, count):
                    self._drop_oldest()
                kept_from = seq - len(ring)
                for sub in self.subs:
                    if sub.cursor < kept_from and not (sub.resync or sub.notify_only):
                        self.hub._overflowed()
                        sub.request_resync()
        ring.append(frame)
        self.ring_bytes += size
        self.ring_events += count
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
            self.ring_bytes = self.ring_events = 0
            self.cached = None
        else:
            for _ in range(low - base):
                self._drop_oldest()

    def _full(self, size: int, count: int) -> bool:
        """A frame of `size` and `count` events does not fit beside the ring's."""
        return self.ring_events + count > self.limit or self.ring_bytes + size > self.byte_limit

    def _drop_oldest(self) -> None:
        frame = self.ring.popleft()
        self.ring_bytes -= frame.size
        self.ring_events -= frame.count

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
