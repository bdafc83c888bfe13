"""SSE load generator: thousands of streams from one process on bare asyncio Protocols.

~900 lines: the stream reader, the publishers (one event per POST and batches) and their
parsing modes share the protocol classes and the per-stream bookkeeping they measure.

Each stream is one `loop.create_connection` with a small Protocol that sends the GET and
parses the (possibly chunked) event-stream bytes incrementally. Publishers put
`"message":"B<lane>:<seq>:<time.time()>"` in every event; a receiver finds that marker in
each data line (a regex over the received block, no JSON decoding of the rest), checks the
sequence per publisher lane (every event, once, in order) and records the delay from the
publisher's clock to receipt in a histogram (0.1 ms bins).

Why not `server.client.EventStreamParser`: this process's CPU share is part of the measured
figures (on a shared box the generator competes with the server), and the client's parser
decodes every byte to text, splits every line and builds one object per frame, where the
fast path here is a regex over each block of whole frames (and, in the default `--parse
shared` mode, one parse per distinct block for all streams of a workflow). Measured on a
block of 100 node_progress frames: 0.3 us a frame here, 6 us with the client's parser (no
JSON either way), 20 times the cost, which would move every figure in RESULTS.md. The
tests, watch and bench/run_list.py read streams with the client's parser.

With `reconnect`, a stream behaves like EventSource when its connection ends: it waits the
last `retry:` the server sent (ms), then reconnects with `Last-Event-ID` set to the last
`id:` it received; a `204` stops it for good, any other status fails it (no retry), and a
refused or failed connection attempt is retried after the same delay. Its lane sequences
carry over, so loss and duplicates across reconnections are counted like any others.

Also here: the server-side measurements (RSS and CPU of a process tree from /proc, the
Redis clients of that tree from `CLIENT LIST`) and an HTTP publisher.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis

MARK = re.compile(rb'"message":"B(\d+):(\d+):(\d+\.\d+)"')
BIN_S = 1e-4  # histogram resolution: 0.1 ms
MAX_BIN = 1_200_000  # 120 s; later delays land in the last bin


def raise_nofile() -> int:
    """Raise this process's open-file limit to the hard limit; returns the new soft limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ---------------------------------------------------------------------------------------
# Receiving side


@dataclass
class Recorder:
    """Shared by every stream of one scenario: delay histogram, counters, error tallies."""

    lanes: int = 1
    hist: list[int] = field(default_factory=lambda: [0] * (MAX_BIN + 1))
    received: int = 0
    dups: int = 0  # an event at or below the last seq of its lane (duplicate or reordered)
    skips: int = 0  # events jumped over (a later seq arrived first)
    gaps: int = 0  # `event: gap` frames (our server: trimmed history announced)
    dropped: int = 0  # streams the server closed while we still wanted them
    bad_status: int = 0
    # Only with reconnecting streams:
    reconnects: int = 0  # reconnections answered 200
    connect_errors: int = 0  # reconnection attempts refused, reset or timed out
    ended_204: int = 0  # streams that a 204 told to stop
    statuses: dict[int, int] = field(default_factory=dict)  # non-200 answers to reconnections
    retry_used: list[int] = field(default_factory=list)  # ms waited before each reconnection
    status_samples: list[str] = field(default_factory=list)  # head and body start of some

    def reset_delays(self) -> None:
        self.hist = [0] * (MAX_BIN + 1)

    def percentile(self, q: float) -> float | None:
        """Delay in seconds at quantile q (0..1) of every recorded event."""
        total = sum(self.hist)
        if total == 0:
            return None
        rank = q * (total - 1)
        seen = 0
        for i, n in enumerate(self.hist):
            seen += n
            if seen > rank:
                return (i + 0.5) * BIN_S
        return MAX_BIN * BIN_S

    def max_delay(self) -> float | None:
        for i in range(MAX_BIN, -1, -1):
            if self.hist[i]:
                return (i + 1) * BIN_S
        return None


# Streams of one workflow receive the same bytes: in the "shared" parsing mode each block
# of frames is parsed once for all of them. That flatters the server when the box is
# saturated (1,000 real browsers each parse their own bytes), so the "each" mode
# (`--parse each`) parses every stream's bytes on its own, as real clients do.
_BLOCKS: dict[bytes, tuple[list[tuple[int, int, float]], int]] = {}
SHARED_PARSING = [True]  # a list, so that `--parse` can set it for every stream


def set_parsing(mode: str) -> None:
    """`shared` (parse each distinct block once) or `each` (every stream on its own)."""
    if mode not in ("shared", "each"):
        raise ValueError(f"--parse must be shared or each, got {mode!r}")
    SHARED_PARSING[0] = mode == "shared"
    _BLOCKS.clear()


def parsed_block(block: bytes) -> tuple[list[tuple[int, int, float]], int]:
    """(lane, seq, publish time) of every marked event in `block`, and its gap frames."""
    if not SHARED_PARSING[0]:
        marks = [(int(lane), int(seq), float(ts)) for lane, seq, ts in MARK.findall(block)]
        return marks, block.count(b"event: gap")
    parsed = _BLOCKS.get(block)
    if parsed is None:
        marks = [(int(lane), int(seq), float(ts)) for lane, seq, ts in MARK.findall(block)]
        parsed = (marks, block.count(b"event: gap"))
        if len(_BLOCKS) >= 20_000:
            _BLOCKS.clear()
        _BLOCKS[block] = parsed
    return parsed


@dataclass
class Reconnect:
    """Where a reconnecting SseStream goes back to, and until when it tries."""

    host: str
    port: int
    path: str
    until: float  # loop.time() after which no reconnection starts
    retry_ms: int = 3000  # EventSource's default, until the server sends `retry:`
    connect_timeout: float = 10.0


RETRY = re.compile(rb"(?:^|\n)retry: (\d+)\n")


class SseStream(asyncio.Protocol):
    """One SSE connection: sends the GET, de-chunks, counts and times marked events.

    With `reconnect` the same object serves every connection of one EventSource-like
    client: per-connection parsing state is reset, the lanes' sequences are kept."""

    def __init__(
        self, request: bytes, rec: Recorder, key: int, reconnect: Reconnect | None = None
    ) -> None:
        self.request = request
        self.rec = rec
        self.key = key  # which workflow (index into the ledger) this stream follows
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[int] = self.loop.create_future()
        self.reconnect = reconnect
        self.retry_ms = reconnect.retry_ms if reconnect else 0
        self.last_id: bytes | None = None
        self.connections = 0  # answered with a status (200 or not)
        self.reconnected_at: float | None = None  # loop.time() of the last 200 on a reconnection
        self.finished = False  # a 204 said stop
        self.target: int | None = None  # caught up once `count` reaches it ...
        self.target_since = 0.0  # ... on a connection answered 200 at or after this loop.time()
        self.caught_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._reset()
        self.expect = [0] * rec.lanes
        self.count = 0
        self.closing = False
        self.closed = False

    def _reset(self) -> None:
        """Parsing state of one connection."""
        self.head = b""
        self.in_body = False
        self.chunked = False
        self.raw = b""  # undecoded chunked bytes
        self.chunk_left = 0
        self.need_crlf = False
        self.body = b""  # decoded, not yet a complete frame
        self.body_ended = False  # the last chunk came: the server ended the response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.closed = False
        if self.closing:
            transport.abort()
            return
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before the response: {exc}"))
        elif not self.closing:
            self.rec.dropped += 1
            if self.reconnect is not None and not self.finished:
                self._schedule()

    def close(self) -> None:
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # EventSource's reconnection ------------------------------------------------------

    def _schedule(self) -> None:
        assert self.reconnect is not None
        if self.loop.time() + self.retry_ms / 1000 > self.reconnect.until:
            return  # bounded: no attempt past the deadline
        self.rec.retry_used.append(self.retry_ms)
        self._timer = self.loop.call_later(self.retry_ms / 1000, self._start_reconnect)

    def _start_reconnect(self) -> None:
        self._timer = None
        if not self.closing:
            self._task = self.loop.create_task(self._reconnect())

    def _reconnect_request(self) -> bytes:
        r = self.reconnect
        assert r is not None
        last = b"Last-Event-ID: " + self.last_id + b"\r\n" if self.last_id else b""
        return (
            (
                f"GET {r.path} HTTP/1.1\r\nHost: {r.host}:{r.port}\r\n"
                "Accept: text/event-stream\r\nCache-Control: no-cache\r\n"
            ).encode()
            + last
            + b"\r\n"
        )

    async def _reconnect(self) -> None:
        r = self.reconnect
        assert r is not None
        self._reset()
        self.request = self._reconnect_request()
        try:
            async with asyncio.timeout(r.connect_timeout):
                await self.loop.create_connection(lambda: self, r.host, r.port)
        except (OSError, TimeoutError):
            self.rec.connect_errors += 1
            if not self.closing:
                self._schedule()

    def _fields(self, block: bytes) -> None:
        """EventSource's state from complete frames: the last `id:` and `retry:`."""
        i = block.rfind(b"\nid: ")
        start = i + 5 if i >= 0 else (4 if block.startswith(b"id: ") else -1)
        if start >= 0:
            self.last_id = block[start : block.index(b"\n", start)]
        if b"retry: " in block:
            found = RETRY.findall(block)
            if found:
                self.retry_ms = int(found[-1])

    def data_received(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            self.head = b""
            self.in_body = True
            lines = head.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            self.chunked = any(
                ln.lower().startswith(b"transfer-encoding:") and b"chunked" in ln.lower()
                for ln in lines[1:]
            )
            if not self.ready.done():
                self.ready.set_result(status)
            self.connections += 1
            if self.reconnect is not None and self.connections > 1:
                if status == 200:
                    self.rec.reconnects += 1
                    self.reconnected_at = self.loop.time()
                    self._check_caught_up()
                else:
                    self.rec.statuses[status] = self.rec.statuses.get(status, 0) + 1
                    if status != 204 and len(self.rec.status_samples) < 5:
                        sample = head[:300] + b" | " + data[:300]
                        self.rec.status_samples.append(sample.decode(errors="replace"))
            if status == 204 and self.reconnect is not None:
                self.rec.ended_204 += 1
                self.finished = True
                self.close()
                return
            if status != 200:
                self.rec.bad_status += 1
                self.close()
                return
            if not data:
                return
        if self.chunked:
            data = self._dechunk(data)
        body = self.body + data if self.body else data
        end = body.rfind(b"\n\n")
        if end < 0:
            self.body = body
        else:
            self.body = body[end + 2 :]
            self._frames(body[: end + 2])
        if self.body_ended and self.reconnect is not None and self.transport is not None:
            self.transport.close()  # EventSource: the response ended, so reconnect

    def _dechunk(self, data: bytes) -> bytes:
        buf = self.raw + data if self.raw else data
        out: list[bytes] = []
        pos, size = 0, len(buf)
        while pos < size:
            if self.chunk_left:
                take = min(self.chunk_left, size - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self.chunk_left -= take
                if self.chunk_left:
                    break
                self.need_crlf = True
            if self.need_crlf:
                if size - pos < 2:
                    break
                pos += 2
                self.need_crlf = False
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                break
            n = int(buf[pos:nl].split(b";", 1)[0], 16)
            pos = nl + 2
            if n == 0:  # the server ended the body
                self.body_ended = True
                break
            self.chunk_left = n
        self.raw = buf[pos:]
        return b"".join(out)

    def _frames(self, block: bytes) -> None:
        now = time.time()
        rec = self.rec
        hist = rec.hist
        expect = self.expect
        marks, gaps = parsed_block(block)
        n = 0
        for lane, seq, ts in marks:
            want = expect[lane]
            if seq != want:
                if seq < want:
                    rec.dups += 1
                    continue
                rec.skips += seq - want
            expect[lane] = seq + 1
            n += 1
            b = int((now - ts) / BIN_S)
            hist[b if 0 <= b < MAX_BIN else (0 if b < 0 else MAX_BIN)] += 1
        self.count += n
        rec.received += n
        rec.gaps += gaps
        if self.reconnect is not None:
            self._fields(block)
            self._check_caught_up()

    def set_target(self, target: int, since: float) -> None:
        """Caught up: `count` >= `target` on a reconnection answered at or after `since`."""
        self.target, self.target_since = target, since
        self._check_caught_up()

    def _check_caught_up(self) -> None:
        if (
            self.target is not None
            and self.caught_at is None
            and self.count >= self.target
            and self.reconnected_at is not None
            and self.reconnected_at >= self.target_since
        ):
            self.caught_at = self.loop.time()


class StreamGroup:
    """Opens, holds and closes many SseStreams against one server."""

    def __init__(self, host: str, port: int, rec: Recorder) -> None:
        self.host = host
        self.port = port
        self.rec = rec
        self.streams: list[SseStream] = []
        self.failed: list[str] = []

    def request(self, path: str) -> bytes:
        return (
            f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
        ).encode()

    async def open(
        self,
        paths: Sequence[tuple[int, str]],
        *,
        concurrency: int = 50,
        timeout: float = 120.0,
        reconnect_until: float | None = None,
    ) -> float:
        """Open one stream per (key, path); returns seconds taken. Failures go to `failed`.

        With `reconnect_until` (a loop.time()), streams reconnect like EventSource until then."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        deadline = started + timeout
        sem = asyncio.Semaphore(concurrency)

        async def one(key: int, path: str) -> None:
            async with sem:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.failed.append("timeout before connecting")
                    return
                proto: SseStream | None = None
                try:
                    async with asyncio.timeout(min(left, 30.0)):
                        _t, proto = await loop.create_connection(
                            lambda: SseStream(
                                self.request(path),
                                self.rec,
                                key,
                                None
                                if reconnect_until is None
                                else Reconnect(self.host, self.port, path, reconnect_until),
                            ),
                            self.host,
                            self.port,
                        )
                        self.streams.append(proto)
                        status = await proto.ready
                    if status != 200:
                        self.failed.append(f"HTTP {status}")
                except (OSError, TimeoutError, ConnectionError) as exc:
                    self.failed.append(f"{type(exc).__name__}: {exc}"[:120])
                    if proto is not None:
                        proto.close()

        await asyncio.gather(*(one(k, p) for k, p in paths))
        return time.monotonic() - started

    @property
    def established(self) -> int:
        return sum(
            1 for s in self.streams if s.ready.done() and not s.closed and not s.ready.exception()
        )

    def total_received(self) -> int:
        return sum(s.count for s in self.streams)

    async def wait_for(
        self, done: Callable[[], bool], timeout: float, *, stall: float | None = None
    ) -> bool:
        """Poll `done` every 50 ms until true, `timeout` passed, or nothing arrived for `stall`."""
        end = time.monotonic() + timeout
        last_count, last_change = self.rec.received, time.monotonic()
        while time.monotonic() < end:
            if done():
                return True
            await asyncio.sleep(0.05)
            if self.rec.received != last_count:
                last_count, last_change = self.rec.received, time.monotonic()
            elif stall is not None and time.monotonic() - last_change > stall:
                return done()
        return done()

    async def close(self) -> None:
        for s in self.streams:
            s.close()
        self.streams.clear()
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------------------
# Publishing side


def timestamp_now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def event_json(
    workflow_id: str, lane: int, seq: int, now: float, stamp: str, idem: bool = False
) -> str:
    """A valid `node_progress` event carrying the publisher's lane, sequence and clock.

    With `idem`, also an `idempotency_key` naming the lane and sequence, so a retried POST
    of the same body stores nothing twice."""
    key = f',"idempotency_key":"L{lane}S{seq}"' if idem else ""
    return (
        f'{{"event_type":"node_progress","workflow_id":"{workflow_id}","node_id":"n1",'
        f'"fraction":0.5,"message":"B{lane}:{seq}:{now:.6f}","timestamp":"{stamp}"{key}}}'
    )


@dataclass
class Ledger:
    """What was published successfully: per workflow key, per lane, the next sequence."""

    workflows: int
    lanes: int
    next_seq: list[list[int]] = field(init=False)
    ok: int = 0
    errors: int = 0  # failed POSTs (each attempt)
    posts: int = 0
    retries: int = 0  # failed POSTs sent again (same body, same idempotency keys)
    gave_up: int = 0  # sends that failed for good
    error_samples: list[str] = field(default_factory=list)
    _locks: dict[tuple[int, int], asyncio.Lock] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.next_seq = [[0] * self.lanes for _ in range(self.workflows)]

    def lock(self, key: int, lane: int) -> asyncio.Lock:
        """One POST in flight per (workflow, lane): the sequence stays in order."""
        found = self._locks.get((key, lane))
        if found is None:
            found = self._locks[(key, lane)] = asyncio.Lock()
        return found

    def published(self, key: int) -> int:
        return sum(self.next_seq[key])


class HttpConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection, one request at a time.

    A few lines of parsing instead of a client library: the publisher shares the machine's
    two cores with the server it measures, so every microsecond it spends per POST is
    taken from the server (aiohttp's client cost several times this per request). Answers
    with a Content-Length or chunked body are read; anything else ends the connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        answer = self._answer()
        if answer is not None and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(answer)

    def _answer(self) -> tuple[int, bytes] | None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = buf[:end].split(b"\r\n")
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        status = int(head[0].split(b" ", 2)[1])
        pos = end + 4
        if headers.get(b"transfer-encoding") == b"chunked":
            body = []
            while True:
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    return None
                n = int(buf[pos:nl].split(b";")[0], 16)
                if len(buf) < nl + 2 + n + 2:
                    return None
                body.append(buf[nl + 2 : nl + 2 + n])
                pos = nl + 2 + n + 2
                if n == 0:
                    break
            content = b"".join(body)
        else:
            length = int(headers.get(b"content-length", b"0"))
            if len(buf) < pos + length:
                return None
            content, pos = buf[pos : pos + length], pos + length
        self.buf = buf[pos:]
        if headers.get(b"connection") == b"close" and self.transport is not None:
            self.transport.close()
        return status, content

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.lost or self.transport is None:
            raise ConnectionError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class HttpPublisher:
    """POSTs events over keep-alive HTTP; one JSON array per POST when `batch` is allowed.

    Up to `pool` connections (HttpConn), opened as needed and kept; `warm()` opens them
    before a measurement. With `retry_for` > 0 every event carries an idempotency key and a
    failed POST (refused, reset, timed out, 5xx) is sent again, the same body, with
    backoff, for up to that many seconds: our server then stores each event once however
    often it was sent."""

    def __init__(
        self,
        base: str,
        path: Callable[[str], str],
        *,
        batch: bool,
        pool: int = 32,
        retry_for: float = 0.0,
        timeout: float = 30.0,
    ):
        url = urlsplit(base)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.path = path
        self.batch = batch
        self.retry_for = retry_for
        self.timeout = timeout
        self.idle: list[HttpConn] = []
        self.slots = asyncio.Semaphore(pool)
        self.pool = pool

    async def _connect(self) -> HttpConn:
        loop = asyncio.get_running_loop()
        _t, conn = await loop.create_connection(HttpConn, self.host, self.port)
        return conn

    async def warm(self, connections: int | None = None) -> None:
        """Open `connections` (default: the pool's size) before anything is measured."""
        want = min(self.pool, connections or self.pool) - len(self.idle)
        self.idle += await asyncio.gather(*(self._connect() for _ in range(want)))

    async def aclose(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()

    async def _post(self, ledger: Ledger, workflow_id: str, body: str) -> bool:
        ledger.posts += 1
        data = body.encode()
        raw = (
            f"POST {self.path(workflow_id)} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        ).encode() + data
        async with self.slots:
            conn = None
            try:
                while self.idle:
                    conn = self.idle.pop()
                    if not conn.lost:
                        break
                    conn = None
                async with asyncio.timeout(self.timeout):  # no task per POST, as wait_for has
                    if conn is None:
                        conn = await self._connect()
                    status, answer = await conn.request(raw)
                if not conn.lost:
                    self.idle.append(conn)
                if 200 <= status < 300:
                    return True
                sample = f"HTTP {status} {answer[:100]!r}"
            except (TimeoutError, OSError) as exc:  # ConnectionError is an OSError
                if conn is not None:
                    conn.close()
                sample = f"{type(exc).__name__}: {exc}"
        ledger.errors += 1
        if len(ledger.error_samples) < 5:
            ledger.error_samples.append(sample[:160])
        return False

    async def _post_retrying(self, ledger: Ledger, workflow_id: str, body: str) -> bool:
        if await self._post(ledger, workflow_id, body):
            return True
        if self.retry_for <= 0:
            return False
        deadline = time.monotonic() + self.retry_for
        delay = 0.05
        while time.monotonic() + delay < deadline:
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.25)
            ledger.retries += 1
            if await self._post(ledger, workflow_id, body):
                return True
        ledger.gave_up += 1
        return False

    async def send(self, ledger: Ledger, key: int, workflow_id: str, lane: int, count: int) -> int:
        """Publish `count` events on `lane` in order; returns how many were accepted."""
        async with ledger.lock(key, lane):
            return await self._send(ledger, key, workflow_id, lane, count)

    async def _send(self, ledger: Ledger, key: int, workflow_id: str, lane: int, count: int) -> int:
        now, stamp = time.time(), timestamp_now()
        seqs = ledger.next_seq[key]
        idem = self.retry_for > 0
        if self.batch:
            first = seqs[lane]
            body = (
                "["
                + ",".join(
                    event_json(workflow_id, lane, first + i, now, stamp, idem) for i in range(count)
                )
                + "]"
            )
            if await self._post_retrying(ledger, workflow_id, body):
                seqs[lane] = first + count
                ledger.ok += count
                return count
            return 0
        sent = 0
        for _ in range(count):  # one message per POST, in order
            seq = seqs[lane]
            body = event_json(workflow_id, lane, seq, time.time(), stamp, idem)
            if not await self._post_retrying(ledger, workflow_id, body):
                break
            seqs[lane] = seq + 1
            ledger.ok += 1
            sent += 1
        return sent


# ---------------------------------------------------------------------------------------
# Server-side measurements


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def rss_kib(pids: Sequence[int]) -> int:
    """Sum of VmRSS over `pids`, in KiB."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime over `pids`, in seconds."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def _tcp_sockets() -> list[tuple[int, int, str, str]]:
    """(local port, remote port, state, inode) of every TCP socket in /proc/net/tcp{,6}."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9:
                local = int(parts[1].rsplit(":", 1)[1], 16)
                remote = int(parts[2].rsplit(":", 1)[1], 16)
                rows.append((local, remote, parts[3], parts[9]))
    return rows


def _socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets `pid` holds open."""
    inodes: set[str] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def connections_per_process(pids: Sequence[int], local_port: int) -> list[int]:
    """Per pid: its established TCP connections whose local port is `local_port`.

    For `--workers`: how the kernel spread the accepted streams over the workers."""
    established = {
        inode for local, _, state, inode in _tcp_sockets() if state == "01" and local == local_port
    }
    return [len(_socket_inodes(pid) & established) for pid in pids]


def listening(pids: Sequence[int], local_port: int) -> list[bool]:
    """Per pid: whether it holds a listening TCP socket on `local_port` (a worker of
    `--workers` that is up: aiohttp listens only after the app's startup)."""
    listeners = {
        inode for local, _, state, inode in _tcp_sockets() if state == "0A" and local == local_port
    }
    return [bool(_socket_inodes(pid) & listeners) for pid in pids]


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _local_ports_to(pids: Sequence[int], remote_port: int) -> set[int]:
    """Local TCP ports of `pids`' sockets whose peer port is `remote_port`."""
    inodes = set().union(*(_socket_inodes(pid) for pid in pids))
    return {
        local
        for local, remote, _, inode in _tcp_sockets()
        if inode in inodes and remote == remote_port
    }


async def redis_clients(redis: Redis, pids: Sequence[int], redis_port: int) -> dict[str, int]:
    """The Redis clients that belong to `pids`, by type: pub/sub or normal."""
    ports = _local_ports_to(pids, redis_port)
    counts = {"pubsub": 0, "normal": 0}
    if not ports:
        return counts
    for client in await redis.client_list():
        try:
            port = int(str(client["addr"]).rsplit(":", 1)[1])
        except (KeyError, ValueError):
            continue
        if port not in ports:
            continue
        subs = sum(int(client.get(k, 0) or 0) for k in ("sub", "psub", "ssub"))
        if "P" in str(client.get("flags", "")) or subs > 0:
            counts["pubsub"] += 1
        else:
            counts["normal"] += 1
    return counts


async def redis_free_slots(redis: Redis) -> int:
    """How many more clients this Redis accepts (maxclients - connected_clients)."""
    info: dict[str, Any] = await redis.info("clients")
    config = await redis.config_get("maxclients")
    maxclients = int(str(config["maxclients"]))
    return maxclients - int(info["connected_clients"])


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)
