"""HTTP handlers of the workflow routes, kept thin: parse, call the pieces, answer.

Also the request parsing every handler shares (ids, start ids, one-value query parameters,
counted auth checks) and the opening of a stream (StreamSlot); ~470 lines for that reason.
The operator's routes are server/overview/views.py."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import HttpVersion11, web
from aiohttp.web_protocol import RequestPayloadError
from redis.exceptions import RedisError

from server import app_keys, auth, connections, sse
from server.dashboard import static_dir
from server.fanout.ring import Subscription, ws_text
from server.models import (
    PIECES_BYTES,
    Event,
    EventRejected,
    decode_body,
    is_workflow_id,
    parse_event_id,
)
from server.problems import Problem
from server.publisher import Publisher
from server.store import Page, Store, id_key
from server.streams.events import LAST_KEY, SSE_HEADERS, EventStream, Sink, SseSink
from server.streams.progress_stream import ProgressStream, is_final
from server.streams.registry import StreamHandle

if TYPE_CHECKING:
    from server import wire

logger = logging.getLogger(__name__)
T = TypeVar("T")

JSON_TYPES = ("application/json",)

# A body over PIECES_BYTES is decoded and validated in this thread: the SPEC's largest plan
# costs about 80 ms of CPU, on the loop a stall of every stream. models does it in pieces
# of a few ms, so the thread gives the loop the GIL back at every switch interval (5 ms).
# One thread: more would only take turns at the GIL with the loop.
_BODIES = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wfsse-body")


def parse_events(publisher: Publisher, workflow_id: str, body: bytes) -> list[Event]:
    """A publish body's events, validated all-or-nothing; Problem 400 or 422 if not.

    The decoded JSON dies here too: freeing 10,000 nodes' dicts takes milliseconds.
    EventRejected (too deep, a number beyond float range, an invalid event) is answered 422
    by the problem table.
    """
    try:
        raw = decode_body(body)
    except EventRejected:
        raise
    except (UnicodeError, ValueError) as exc:
        raise Problem(400, f"malformed JSON: {exc}", slug="malformed-json") from None
    batch = isinstance(raw, list)
    return publisher.validate(
        workflow_id, raw if batch else [raw], batch=batch, size=len(body), text_checked=True
    )


def workflow_id_of(request: web.Request) -> str:
    """The URL's workflow id (`{workflow_id}`, or the original engine's `{instance_id}`),
    validated before it reaches Redis or a frame."""
    value = request.match_info.get("workflow_id") or request.match_info.get("instance_id", "")
    if not is_workflow_id(value):
        raise Problem(
            400,
            "workflow_id must be 1 to 128 characters of A-Z a-z 0-9 . _ - "
            "starting with a letter or digit",
            slug="bad-workflow-id",
        )
    return value


def start_id_of(request: web.Request) -> str | None:
    """Where a stream starts: Last-Event-ID header, else lastEventId query; empty = absent.

    Both are validated when given, so a malformed one is a 400 even where the other wins.
    """
    # Only spaces and tabs (HTTP's optional whitespace) are trimmed: str.strip() would also
    # take control characters such as \x1f, turning a malformed id into an absent one.
    header = request.headers.get("Last-Event-ID", "").strip(" \t") or None
    query = request.query.get("lastEventId", "").strip(" \t") or None
    for name, value in (("Last-Event-ID", header), ("lastEventId", query)):
        if value is not None and parse_event_id(value) is None:
            raise Problem(
                400, f"{name} must look like <milliseconds>-<sequence>", slug="bad-last-event-id"
            )
    return header or query


def counted(request: web.Request, check: Callable[[], T]) -> T:
    """`check()`, an auth check; a failure is counted in /metrics (tokens are never logged)."""
    try:
        return check()
    except auth.AuthFailed as exc:
        request.app[app_keys.metrics_key].auth_failed(exc.kind, exc.reason)
        raise


def authorize_publish(request: web.Request) -> None:
    """401 unless PUBLISH_TOKEN is unset or given."""
    token = request.app[app_keys.settings_key].publish_token
    counted(request, lambda: auth.check_publish(request.headers.get("Authorization"), token))


def authorize_subscribe(request: web.Request, workflow_id: str) -> None:
    """401/403 unless SUBSCRIBE_SECRET is unset or a token grants `workflow_id`."""
    secret = request.app[app_keys.settings_key].subscribe_secret
    counted(
        request, lambda: auth.check_subscribe(auth.subscriber_token(request), secret, workflow_id)
    )


async def publish_events(request: web.Request) -> web.Response:
    """POST /workflows/{id}/events: one event or a batch, all-or-nothing."""
    workflow_id = workflow_id_of(request)
    authorize_publish(request)  # before the body is read: no 413/415/422 for strangers
    if request.content_type not in JSON_TYPES:
        raise Problem(415, "send events as Content-Type: application/json")
    seconds = request.app[app_keys.settings_key].body_timeout_seconds
    try:
        # A deadline for the whole body, not per read: a byte a minute is closed too.
        async with asyncio.timeout(seconds):
            with connections.reading_body(request):
                body = await request.read()  # client_max_size enforces MAX_BODY_BYTES, chunked too
    except TimeoutError:
        return connections.body_too_slow(request, seconds)
    except (ConnectionError, RequestPayloadError) as exc:
        return connections.client_left(request, exc)  # one INFO line, not a traceback
    publisher = request.app[app_keys.publisher_key]
    if len(body) > PIECES_BYTES:
        loop = asyncio.get_running_loop()
        events = await loop.run_in_executor(_BODIES, parse_events, publisher, workflow_id, body)
    else:
        events = parse_events(publisher, workflow_id, body)
    ids = await publisher.store_events(workflow_id, events)
    # A wire.Accepted. Stream ids are digits and a dash: the answer needs no JSON encoder.
    return web.Response(
        text='{"ids": ["' + '", "'.join(ids) + '"]}',
        status=201,
        content_type="application/json",
    )


class StreamSlot:
    """A slot under MAX_STREAMS and a confirmed hub subscription, for any kind of stream.

    A class, not an @asynccontextmanager: it lives as long as its stream, and a generator
    frame per stream is memory that 10,000 streams multiply.
    """

    __slots__ = ("gauge", "handle", "kind", "request", "sub", "workflow_id")

    def __init__(self, request: web.Request, workflow_id: str, kind: str) -> None:
        self.request, self.workflow_id, self.kind = request, workflow_id, kind

    async def __aenter__(self) -> tuple[StreamHandle, Subscription]:
        app = self.request.app
        hub, registry = app[app_keys.hub_key], app[app_keys.streams_key]
        if hub.down_for(self.workflow_id):
            raise Problem(
                503, "Redis is unavailable; try again shortly", headers={"Retry-After": "1"}
            )
        self.handle = registry.acquire()  # StreamsFull: 503 too-many-streams
        # A client that leaves ends its stream at once, not at the next heartbeat's write.
        connections.hold_stream(self.request, self.handle.client_left)
        try:
            # Redis is up (maybe slow, as in a reconnect storm): not waiting for it to
            # confirm, the stream answers 200 and waits itself (with keep-alives), since a
            # 503 would end an EventSource for good.
            self.sub = await hub.attach(self.workflow_id)
        except BaseException:
            registry.release(self.handle)
            connections.release_stream(self.request)
            raise
        self.gauge = app[app_keys.metrics_key].open_streams.labels(self.kind)
        self.gauge.inc()
        app[app_keys.watchers_key].opened(self.workflow_id)
        return self.handle, self.sub

    async def __aexit__(self, *exc_info: object) -> None:
        app = self.request.app
        self.gauge.dec()
        app[app_keys.watchers_key].closed(self.workflow_id)
        # The slot is free before the UNSUBSCRIBE round trip, which a slow Redis may stretch.
        app[app_keys.streams_key].release(self.handle)
        connections.release_stream(self.request)
        await app[app_keys.hub_key].detach(self.sub)


async def sse_response(request: web.Request) -> web.StreamResponse:
    """Send the SSE headers and the opening `retry:`."""
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    if request.version >= HttpVersion11:
        # Said explicitly (aiohttp would choose it too) so SseSink knows how to frame
        # the writes it makes straight to the transport.
        response.enable_chunked_encoding()
    await response.prepare(request)
    connections.mark_started(request, response)  # an error after this cannot be an answer
    await response.write(sse.encode(retry=request.app[app_keys.settings_key].retry_ms))
    return response


async def finished_before(store: Store, workflow_id: str, start: str) -> bool:
    """The last event is terminal and the client has it: nothing will ever follow.

    A function of its own so the last entry (up to MAX_EVENT_BYTES) is not kept alive in
    the frame of a stream that then stays open for hours.
    """
    last = await store.last_entry(workflow_id)
    return last is not None and last.terminal and id_key(start) >= last.key


def event_stream(
    request: web.Request,
    sink: Sink,
    sub: Subscription,
    handle: StreamHandle,
    start: str | None,
    *,
    check_finished: bool = False,
) -> EventStream:
    """An EventStream wired to this app's store, progress and metrics (SSE or WebSocket)."""
    app = request.app
    metrics = app[app_keys.metrics_key]
    if start is not None:
        metrics.replays_total.inc()
    return EventStream(
        sink,
        app[app_keys.store_key],
        sub,
        start=start,
        heartbeat=app[app_keys.settings_key].heartbeat_seconds,
        handle=handle,
        progress=app[app_keys.tracker_key].snapshot,
        on_sent=metrics.events_delivered_total.inc,
        on_live=metrics.observe_frames,
        on_gap=metrics.gaps_total.inc,
        check_finished=check_finished,
    )


async def stream_events(request: web.Request) -> web.StreamResponse:
    """GET /workflows/{id}/events: replay after the client's id, then live (or, asked for
    JSON, a page of the retained history)."""
    workflow_id = workflow_id_of(request)
    authorize_subscribe(request, workflow_id)
    start = start_id_of(request)
    # Checked in either form, as both start ids are: a malformed one is never ignored.
    after, limit = page_params(request)
    if wants_json(request):
        return await history_page(request, workflow_id, after, limit)
    app = request.app
    store = app[app_keys.store_key]

    try:
        finished = start is not None and await finished_before(store, workflow_id, start)
    except RedisError:
        if app[app_keys.hub_key].down_for(workflow_id):
            raise
        # Redis is up but did not answer in time (a reconnect storm): a 503 would end an
        # EventSource for good, so the stream asks again once Redis answers.
        finished = None
    if finished:
        return web.Response(status=204)  # tells EventSource to stop reconnecting

    async with StreamSlot(request, workflow_id, "events") as (handle, sub):
        response = await sse_response(request)
        if request.transport is None:
            return response  # the client left already
        sink = SseSink(response, request.transport)
        stream = event_stream(request, sink, sub, handle, start, check_finished=finished is None)
        try:
            await stream.run()
        except (ConnectionResetError, RedisError):
            pass
        return response


PAGE_DEFAULT, PAGE_MAX = 100, 1000  # events per JSON history page


def wants_json(request: web.Request) -> bool:
    """Accept names application/json and not text/event-stream: the history as a page."""
    accept = request.headers.get("Accept", "").lower()
    return "application/json" in accept and "text/event-stream" not in accept


def page_params(request: web.Request) -> tuple[str | None, int]:
    """`after` (an event id, exclusive; empty = absent) and `limit` (1..PAGE_MAX), or 400."""
    after = (single(request, "after") or "").strip(" \t") or None
    if after is not None and parse_event_id(after) is None:
        raise Problem(
            400,
            "after must look like <milliseconds>-<sequence>",
            errors=[{"loc": ["query", "after"], "msg": "not an event id"}],
            slug="bad-event-id",
        )
    return after, limit_of(request, PAGE_DEFAULT, PAGE_MAX)


def limit_of(request: web.Request, default: int, most: int) -> int:
    """The `limit` query parameter: absent is `default`; anything but an integer from 1 to
    `most`, in ASCII digits, is a 400 (an empty `limit=` too: the OpenAPI document says
    integer, and a limit silently read as the default would hide a client's bug)."""
    raw = single(request, "limit")
    if raw is None:
        return default
    limit = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 10 else 0
    if not 1 <= limit <= most:
        raise query_problem(
            "limit",
            f"limit must be an integer from 1 to {most}",
            f"expected 1 to {most}",
            "bad-limit",
        )
    return limit


async def history_page(
    request: web.Request, workflow_id: str, after: str | None, limit: int
) -> web.Response:
    """Up to `limit` retained events after `after` as JSON: one read, two with `after`.

    A wire.HistoryPage: the events are the stored JSON with `"id"` first (the WebSocket's
    text), joined as they are stored: no event is parsed or encoded again.
    """
    store = request.app[app_keys.store_key]
    # One more than asked: whether a next page exists is known without another read.
    if after is not None and id_key(after) == LAST_KEY:
        page = Page(None, [])  # nothing follows the largest id (and Redis refuses "(" it)
    else:
        page = await store.read_after(workflow_id, after, limit + 1)
    entries = page.entries
    if after is None:
        earliest = entries[0].id if entries else None
    else:
        first = (await store.read_after(workflow_id, None, 1)).entries
        earliest = first[0].id if first else None
    if earliest is None:
        raise Problem(
            404,
            f"workflow {workflow_id!r} is unknown (no events, or expired)",
            slug="unknown-workflow",
        )
    more = len(entries) > limit
    entries = entries[:limit]
    body = "".join(
        (
            '{"events":[',
            ",".join(ws_text(e.id, e.data) for e in entries),
            '],"next":',
            f'"{entries[-1].id}"' if more else "null",
            ',"earliest_available":"',
            earliest,
            '"}',
        )
    )
    headers = {"Cache-Control": "no-cache", "Vary": "Accept"}
    return web.Response(text=body, content_type="application/json", headers=headers)


def query_problem(name: str, detail: str, msg: str, slug: str) -> Problem:
    return Problem(400, detail, errors=[{"loc": ["query", name], "msg": msg}], slug=slug)


def single(request: web.Request, name: str) -> str | None:
    """A query parameter that takes one value: given twice, which one would count is a
    guess, so it is a 400 rather than the first one silently."""
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise query_problem(
            name,
            f"{name} is given {len(values)} times; give it once",
            "given more than once",
            "repeated-parameter",
        )
    return values[0] if values else None


def _etag_matches(header: str, etag: str) -> bool:
    candidates = (c.strip().removeprefix("W/").strip('"') for c in header.split(","))
    return any(c in (etag, "*") for c in candidates)


async def get_progress(request: web.Request) -> web.StreamResponse:
    """GET /workflows/{id}/progress: JSON with ETag, or a stream of `event: progress`."""
    workflow_id = workflow_id_of(request)
    authorize_subscribe(request, workflow_id)
    streamed = "text/event-stream" in request.headers.get("Accept", "")
    # The stream form validates its start like the events stream: a malformed one is a 400.
    start = start_id_of(request) if streamed else None
    tracker = request.app[app_keys.tracker_key]
    snap = await tracker.snapshot(workflow_id)
    if snap is None:
        raise Problem(
            404,
            f"workflow {workflow_id!r} is unknown (no events, or expired)",
            slug="unknown-workflow",
        )
    if streamed:
        return await _progress_stream(request, workflow_id, snap, start)
    etag = snap["last_event_id"] or ""
    headers = {"ETag": f'"{etag}"', "Cache-Control": "no-cache"}
    if _etag_matches(request.headers.get("If-None-Match", ""), etag):
        return web.Response(status=304, headers=headers)
    return web.json_response(snap, headers=headers, dumps=dumps)


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


async def _progress_stream(
    request: web.Request, workflow_id: str, snap: wire.Progress, start: str | None
) -> web.StreamResponse:
    app = request.app
    if start is not None and is_final(snap) and start == snap["last_event_id"]:
        return web.Response(status=204)  # the final object was seen: stop reconnecting
    async with StreamSlot(request, workflow_id, "progress") as (handle, sub):
        response = await sse_response(request)
        stream = ProgressStream(
            response,
            sub,
            snapshot=app[app_keys.tracker_key].snapshot,
            heartbeat=app[app_keys.settings_key].heartbeat_seconds,
            handle=handle,
        )
        await stream.run()
        return response


async def index(request: web.Request) -> web.FileResponse:
    """The dashboard page."""
    return web.FileResponse(static_dir() / "index.html")


async def healthz(request: web.Request) -> web.Response:
    """200 while the process serves; the pid tells workers apart."""
    return web.json_response({"status": "ok", "pid": os.getpid()})


# A frozen Redis would hold /readyz for the whole command deadline (5 s): a load balancer's
# probe wants its answer sooner, and one second is long for a PING.
READY_TIMEOUT = 1.0


async def readyz(request: web.Request) -> web.Response:
    """200 when Redis answers a PING within READY_TIMEOUT, else 503."""
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await request.app[app_keys.redis_key].ping()
    except TimeoutError:
        raise Problem(
            503,
            f"Redis did not answer a PING within {READY_TIMEOUT:g} s",
            headers={"Retry-After": "1"},
        ) from None
    except (RedisError, OSError) as exc:
        raise Problem(503, f"Redis does not answer: {exc}", headers={"Retry-After": "1"}) from None
    return web.json_response({"status": "ready"})
