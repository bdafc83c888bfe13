"""Connection limits and deadlines: slow, idle or abandoned connections never take the
process's file descriptors, and what aiohttp answers before the app runs is problem+json.

aiohttp by itself times out nothing but idle keep-alives (75 s under `run_app`), so a head
or a body sent a byte a minute holds its descriptor for good, and 20,000 of them took every
fd of a process: then `accept()` fails with EMFILE, asyncio logs that about 17,000 times a
second, and even /healthz gets no answer. Here:

- a request head must be complete `HEADER_TIMEOUT_SECONDS` after the connection opened (or
  after its first byte, on a kept-alive connection), else the connection is closed;
- a publish body must be complete `BODY_TIMEOUT_SECONDS` after its head (408, then closed;
  see `reading_body`, used by the publish handler);
- at most `MAX_CONNECTIONS` connections that are not streams: past it, the oldest one that
  is idle or still sending a head or a body is closed to make room, so a flood of slow
  clients only ever evicts its own kind while a real request (one packet) gets in;
- both that cap and `MAX_STREAMS` are lowered to what the fd limit leaves room for
  (`fit_to_fd_limit`), so the limits are reached before EMFILE is;
- what must be logged at the limits is logged at most once per `LOG_INTERVAL` per kind.

Streams (SSE and WebSocket) are long-lived by design: once a handler holds a stream slot
(`hold_stream`) the connection is outside the cap and the deadlines, and its end is seen at
once (`on_lost`), not at the next heartbeat.

The protocol is a subclass of aiohttp's `RequestHandler`; it relies on a few private
attributes (`RequestHandler._messages`, `Server._kwargs`, `AppRunner._make_server`,
`TCPSite._server`), checked against aiohttp 3.14.

Why one module of ~600 lines: every piece here patches the same few aiohttp internals
(the protocol, the server, the runner) and must change together when aiohttp does.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import resource
import socket
import sys
import termios
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_runner import GracefulExit
from aiohttp.web_server import Server

from server import app_keys
from server.metrics import Metrics
from server.settings import Settings
from server.throttle import Throttle

logger = logging.getLogger(__name__)

# Descriptors kept out of both caps: one accept batch (BACKLOG) can be taken before the
# protocol sees any of it, and a closed socket is freed one loop pass later; the Redis pool
# (64, more on a Cluster), the pub/sub connections, the event loop, logs and static files.
FD_RESERVE = 512
BACKLOG = 128  # aiohttp's default: accepts per loop pass (see deepen_listen_queue)
LISTEN_BACKLOG = 4096  # the kernel's queue of connections not accepted yet (somaxconn caps it)
MIN_SLOTS = 16  # the floor of either cap, however low the fd limit
# After an error answer (408, 413...) the unread rest of a body is read for this long so the
# client sees the answer instead of a reset; aiohttp's 10 s would extend every deadline.
LINGER_SECONDS = 2.0
KEEPALIVE_SECONDS = 75.0  # idle keep-alive, as under web.run_app; idle ones are evicted first
EVICT_SCAN = 16  # the oldest evictable connections looked at for one with nothing unread

HEAD, REQUEST, BODY, STREAM = "head", "request", "body", "stream"  # a connection's phase


throttle = Throttle(logger)


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; (before, now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return soft, hard
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the fd limit from %d to %d: %s", soft, hard, exc)
    return soft, soft


def fit_to_fd_limit(settings: Settings, fd_limit: int) -> Settings:
    """MAX_CONNECTIONS and MAX_STREAMS lowered so that both caps are reached before EMFILE."""
    if fd_limit == resource.RLIM_INFINITY or fd_limit < 0:
        return settings
    budget = max(fd_limit - FD_RESERVE, 2 * MIN_SLOTS)
    conns = min(settings.max_connections, max(budget // 2, MIN_SLOTS))
    streams = min(settings.max_streams, max(budget - conns, MIN_SLOTS))
    return replace(settings, max_connections=conns, max_streams=streams)


def apply_fd_limit(settings: Settings) -> Settings:
    """At start: raise the fd limit, fit the caps to it, and say so once."""
    before, fds = raise_fd_limit()
    fitted = fit_to_fd_limit(settings, fds)
    logger.info(
        "fd limit %d (soft limit was %d): MAX_STREAMS %d (configured %d), MAX_CONNECTIONS "
        "%d (configured %d), %d descriptors kept for Redis and the accept loop",
        fds,
        before,
        fitted.max_streams,
        settings.max_streams,
        fitted.max_connections,
        settings.max_connections,
        FD_RESERVE,
    )
    return fitted


def unread(conn: RequestHandler) -> int:
    """Bytes the kernel holds for `conn` that the loop has not read yet (FIONREAD)."""
    transport = conn.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int.from_bytes(raw, sys.byteorder)


def problem(status: int, detail: str, slug: str) -> web.Response:
    """A problem+json answer (RFC 9457, the shape of problems.py) that closes the connection."""
    body = {
        "type": f"/problems/{slug}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    resp = web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/problem+json",
        charset="utf-8",
    )
    resp.force_close()
    return resp


class Guard:
    """A process's connections: the cap on those that are not streams, and the head deadline."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.max_connections = settings.max_connections
        self.header_timeout = settings.header_timeout_seconds
        self.metrics = metrics
        self.conns: set[GuardedRequestHandler] = set()
        self.others: set[GuardedRequestHandler] = set()  # not streams: what the cap counts
        # Idle, or still sending a head or a body: the ones to close first, oldest first.
        self.evictable: dict[GuardedRequestHandler, None] = {}

    def shed(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.connections_shed_total.labels(reason).inc()

    def admit(self, conn: GuardedRequestHandler) -> bool:
        """Make room for `conn` under MAX_CONNECTIONS; False when nothing can be closed."""
        if len(self.others) >= self.max_connections:
            victim = self._victim()
            if victim is None:
                self.shed("refused")
                throttle(
                    logging.WARNING,
                    "refused",
                    "%d connections are busy (MAX_CONNECTIONS): refusing new ones",
                    len(self.others),
                )
                return False
            self.forget(victim)
            victim.force_close()
            self.shed("evicted")
            throttle(
                logging.WARNING,
                "evicted",
                "%d connections that are not streams are open "
                "(MAX_CONNECTIONS): closing the oldest idle or slow ones for new ones",
                len(self.others) + 1,
            )
        self.conns.add(conn)
        self.others.add(conn)
        self.evictable[conn] = None
        return True

    def _victim(self) -> GuardedRequestHandler | None:
        """The oldest idle or slow connection with nothing unread, else the oldest.

        A connection is read a few loop passes after its accept, and a pass accepts up to
        BACKLOG more: in a flood, a real client's request would be closed before it was
        read. One that has bytes waiting in the kernel is about to make progress; one with
        none is waiting for its client.
        """
        oldest = None
        for i, conn in enumerate(self.evictable):
            if i == EVICT_SCAN:
                break
            oldest = oldest or conn
            if not unread(conn):
                return conn
        return oldest

    def forget(self, conn: GuardedRequestHandler) -> None:
        self.conns.discard(conn)
        self.others.discard(conn)
        self.evictable.pop(conn, None)

    def busy(self, conn: GuardedRequestHandler) -> None:
        self.evictable.pop(conn, None)

    def idle(self, conn: GuardedRequestHandler) -> None:
        if conn in self.others:
            self.evictable.pop(conn, None)
            self.evictable[conn] = None  # the newest now

    def streaming(self, conn: GuardedRequestHandler, on: bool) -> None:
        if on:
            self.others.discard(conn)
            self.evictable.pop(conn, None)
        elif conn in self.conns:
            self.others.add(conn)

    def phases(self) -> Counter[str]:
        """How many connections are in each phase (for tests and debugging)."""
        return Counter(conn.phase for conn in self.conns)


class GuardedRequestHandler(RequestHandler):
    """aiohttp's HTTP protocol under a Guard: a head deadline, the cap, problem+json errors."""

    __slots__ = ("guard", "head_timer", "on_lost", "phase", "started", "started_for")

    def __init__(self, manager: Server, *, guard: Guard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = guard
        self.head_timer: asyncio.TimerHandle | None = None
        self.on_lost: Callable[[], None] | None = None
        self.phase = HEAD
        # The response a stream handler prepared, and its request (see mark_started).
        self.started: web.StreamResponse | None = None
        self.started_for: BaseRequest | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.guard.admit(self):
            self.force_close()
            return
        self._arm_head()

    def _arm_head(self) -> None:
        self.head_timer = self._loop.call_later(self.guard.header_timeout, self._head_late)

    def _disarm(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_late(self) -> None:
        self.head_timer = None
        if self.phase == HEAD and self.transport is not None:
            self.guard.shed("head_timeout")
            throttle(
                logging.INFO,
                "head",
                "closed a connection from %s: no complete request "
                "head within %g s (HEADER_TIMEOUT_SECONDS)",
                self.peername,
                self.guard.header_timeout,
            )
            self.force_close()

    def data_received(self, data: bytes) -> None:
        if self.phase == HEAD and self.head_timer is None and data and self.transport:
            self._arm_head()  # the first byte of the next head on a kept-alive connection
        super().data_received(data)
        if self.phase == HEAD and self._messages:
            self.phase = REQUEST
            self._disarm()
            self.guard.busy(self)

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            if self.phase != STREAM and not self._messages:
                self.phase = HEAD  # idle until the next head's first byte arms the deadline
                self.guard.idle(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self.guard.forget(self)
        on_lost, self.on_lost = self.on_lost, None
        super().connection_lost(exc)
        if on_lost is not None:
            on_lost()

    def hold(self, on_lost: Callable[[], None] | None) -> None:
        """This connection carries a stream now (None: not any more)."""
        if on_lost is not None and self.transport is None:
            on_lost()  # gone already
            return
        self.phase = STREAM if on_lost is not None else REQUEST
        self.on_lost = on_lost
        self.guard.streaming(self, on_lost is not None)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """problem+json that echoes nothing of the request (aiohttp's text/plain quotes it)."""
        if isinstance(exc, ConnectionError):
            throttle(
                logging.INFO,
                "left",
                "client %s left during %s %s",
                request.remote,
                request.method,
                request.path,
            )
        elif status == HTTPStatus.INTERNAL_SERVER_ERROR:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:
            self.guard.shed("bad_request")
            throttle(
                logging.INFO,
                "parse",
                "answered %d to %s: %s",
                status,
                request.remote,
                type(exc).__name__,
            )
        if request.writer.output_size > 0:
            raise ConnectionError("the response was sent already; cannot send an error")
        if status == HTTPStatus.BAD_REQUEST:
            return problem(status, "the request is not valid HTTP/1.1", "bad-http-request")
        phrase = HTTPStatus(status).phrase
        return problem(status, phrase, phrase.lower().replace(" ", "-"))


def hold_stream(request: BaseRequest, on_lost: Callable[[], None]) -> None:
    """The request's connection carries a stream: outside MAX_CONNECTIONS and the deadlines,
    and `on_lost` runs as soon as the client closes it."""
    conn = request.protocol
    if isinstance(conn, GuardedRequestHandler):
        conn.hold(on_lost)
    elif request.transport is None:
        on_lost()


# Where a response that started is kept under a plain aiohttp protocol (the test server).
_STARTED = web.RequestKey("connections_started", web.StreamResponse)


def mark_started(request: BaseRequest, response: web.StreamResponse) -> None:
    """A stream's response has been prepared: its head is on the wire, and an error after
    this cannot be answered (see problems.problem_middleware). Kept in the connection's own
    slots, not in the request's dict: an entry there cost 0.15 KiB per open stream, and an
    on_response_prepare hook a coroutine per response (bench.fanout S1, connect_s +27%)."""
    conn = request.protocol
    if isinstance(conn, GuardedRequestHandler):
        conn.started, conn.started_for = response, request
    else:
        request[_STARTED] = response


def started(request: BaseRequest) -> web.StreamResponse | None:
    """The response mark_started() recorded for this request, if any."""
    conn = request.protocol
    if isinstance(conn, GuardedRequestHandler):
        return conn.started if conn.started_for is request else None
    return request.get(_STARTED)


def release_stream(request: BaseRequest) -> None:
    """The stream has ended; the connection counts as a request again."""
    conn = request.protocol
    if isinstance(conn, GuardedRequestHandler) and conn.phase == STREAM:
        conn.hold(None)  # `started` stays: the error that ended the stream is still on its way


@contextmanager
def reading_body(request: BaseRequest) -> Iterator[None]:
    """While a handler waits for a body: the connection is one of the first to close."""
    conn = request.protocol
    if not isinstance(conn, GuardedRequestHandler):
        yield
        return
    conn.phase = BODY
    conn.guard.idle(conn)
    try:
        yield
    finally:
        if conn.phase == BODY:
            conn.phase = REQUEST
            conn.guard.busy(conn)


def body_too_slow(request: web.Request, seconds: float) -> web.Response:
    """408 for a body not complete within BODY_TIMEOUT_SECONDS; the connection closes."""
    request.app[app_keys.metrics_key].connections_shed_total.labels("body_timeout").inc()
    throttle(
        logging.INFO,
        "body",
        "answered 408 to %s: body not complete within %g s (BODY_TIMEOUT_SECONDS)",
        request.remote,
        seconds,
    )
    return problem(408, f"the request body did not arrive within {seconds:g} s", "request-timeout")


def client_left(request: web.Request, exc: BaseException) -> web.Response:
    """The client closed the connection (or broke the body) before its body was read."""
    request.app[app_keys.metrics_key].requests_abandoned_total.inc()
    throttle(
        logging.INFO,
        "abandoned",
        "client %s left during the body of %s %s (%s)",
        request.remote,
        request.method,
        request.path,
        type(exc).__name__,
    )
    return problem(400, "the request body ended before it was complete", "incomplete-body")


def redact(target: str) -> str:
    """`target` (a path with a query, or a URL) with the value of any `*token*` parameter
    replaced by REDACTED."""
    path, sep, rest = target.partition("?")
    if not sep:
        return target
    query, hash_sep, fragment = rest.partition("#")
    parts = []
    for part in query.split("&"):
        name, eq, _ = part.partition("=")
        parts.append(f"{name}=REDACTED" if eq and "token" in unquote_plus(name).lower() else part)
    return f"{path}?{'&'.join(parts)}{hash_sep}{fragment}"


class RedactingAccessLogger(AbstractAccessLogger):
    """One line per request without credentials: token query values redacted (in the path and
    the Referer), Authorization and Cookie never written."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        version = request.version
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.6f "%s" "%s"',
            request.remote,
            request.method,
            redact(request.raw_path),
            version.major,
            version.minor,
            response.status,
            response.body_length,
            time,
            redact(request.headers.get("Referer", "-")),
            request.headers.get("User-Agent", "-"),
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


class GuardedServer(Server):
    """aiohttp's low-level server, making GuardedRequestHandler protocols."""

    def __init__(self, *args: Any, guard: Guard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, guard=self.guard, loop=self._loop, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """An AppRunner whose server makes guarded protocols."""

    def __init__(self, app: web.Application, settings: Settings, **kwargs: Any) -> None:
        access_log = logging.getLogger("aiohttp.access") if settings.access_log else None
        super().__init__(
            app,
            keepalive_timeout=KEEPALIVE_SECONDS,
            lingering_time=LINGER_SECONDS,
            access_log=access_log,
            access_log_class=RedactingAccessLogger,
            **kwargs,
        )
        self.guard = Guard(settings, app[app_keys.metrics_key])

    async def _make_server(self) -> Server:
        # The stock server starts the app and collects the handler's settings; ours is the
        # same with another protocol class (aiohttp has no public hook for it).
        stock = await super()._make_server()
        return GuardedServer(
            stock.request_handler,
            request_factory=stock.request_factory,
            handler_cancellation=stock.handler_cancellation,
            loop=stock._loop,
            guard=self.guard,
            **stock._kwargs,
        )


ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


def exception_handler(previous: ExceptionHandler | None) -> ExceptionHandler:
    """A loop exception handler that logs accept() failures for lack of fds once per interval.

    asyncio reports one per failed accept, up to BACKLOG per loop pass, each retrying a
    second later: 17,000 lines a second were seen at the fd limit.
    """

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in ACCEPT_ERRNOS:
            throttle(logging.ERROR, "accept", "%s: %s", context.get("message"), exc)
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    return handle


def deepen_listen_queue(site: web.TCPSite) -> None:
    """Let the kernel queue LISTEN_BACKLOG connections, while asyncio still accepts BACKLOG
    per loop pass: with a queue of 128, a burst of attackers had the kernel drop a real
    client's SYN, which costs it a second (the SYN retry), whereas the descriptors a
    pass takes before the protocol can close any are what FD_RESERVE must cover."""
    server = site._server
    for sock in getattr(server, "sockets", None) or ():
        with socket.socket(fileno=os.dup(sock.fileno())) as dup:
            dup.listen(LISTEN_BACKLOG)


@dataclass
class Served:
    """A running guarded server."""

    url: str
    port: int
    app: web.Application
    guard: Guard


@asynccontextmanager
async def serve(
    app: web.Application,
    settings: Settings,
    *,
    port: int | None = None,
    reuse_port: bool = False,
    **runner_kwargs: Any,
) -> AsyncIterator[Served]:
    """Serve `app` on a real socket with every protection of production (tests use it too)."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(exception_handler(previous))
    runner = GuardedRunner(app, settings, **runner_kwargs)
    await runner.setup()
    try:
        site = web.TCPSite(
            runner,
            settings.host,
            settings.port if port is None else port,
            backlog=BACKLOG,
            reuse_port=reuse_port or None,
        )
        await site.start()
        deepen_listen_queue(site)
        yield Served(f"http://{settings.host}:{site.port}", site.port, app, runner.guard)
    finally:
        await runner.cleanup()
        loop.set_exception_handler(previous)


def run(
    app: web.Application, settings: Settings, *, reuse_port: bool, shutdown_timeout: float
) -> None:
    """Serve until SIGINT or SIGTERM, as web.run_app does, with the guarded protocol."""
    loop = asyncio.new_event_loop()

    async def forever() -> None:
        async with serve(
            app,
            settings,
            reuse_port=reuse_port,
            handle_signals=True,
            shutdown_timeout=shutdown_timeout,
        ) as served:
            logging.getLogger("server").info("======== Running on %s ========", served.url)
            while True:
                await asyncio.sleep(3600)

    main = loop.create_task(forever())
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    except (GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            _cancel_all(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left and wait for it (as asyncio.run and web.run_app do)."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
