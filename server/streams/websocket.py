"""The original engine's WebSocket endpoint, served from the same hub and streams as SSE.

Messages, all text frames of one JSON object each:
- every stored event: the object the SSE `data:` carries, with `"id"` (its stream id) first;
- trimmed history: `{"event_type": "gap", "requested": <id>, "earliest_available": <id>,
  "progress": {...}}`, with no `id` (it is not a stored event), then the retained events.

Closing: 1000 after the terminal event (and at once for a resume at or past a terminal last
event: the WebSocket twin of SSE's 204); 1001 when the server shuts down, with the reason
`retry_ms=<n>` (a jittered delay, so clients spread their reconnects), so a client comes back
with `?lastEventId=<the last id it got>`. Keep-alive is WebSocket ping/pong every
HEARTBEAT_SECONDS (aiohttp's `heartbeat=`): a peer that does not answer within half of that
is dropped, and reconnects with its id.

Memory per socket is bounded the way it is for SSE: live frames wait in the hub's bounded
per-workflow ring (a socket that falls out of it catches up from Redis), and `send_str`
waits for the socket to drain once aiohttp's writer holds more than its limit, so a stalled
reader stalls only its own stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, WSMsgType, web
from redis.exceptions import RedisError

from server import app_keys, auth, connections, cors, views
from server.fanout.ring import Live, ws_text
from server.problems import Problem
from server.store import Entry
from server.streams.events import ClientGone, EventStream

if TYPE_CHECKING:
    from server import wire

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT = 2.0  # how long a close waits for the peer's close frame
MAX_CLIENT_MESSAGE = 64 * 1024  # clients have nothing to say; what they send is ignored


class WsSink:
    """Stream events as WebSocket text messages (the Sink protocol of streams.py)."""

    __slots__ = ("ws",)
    direct = False  # aiohttp frames WebSocket messages; every write goes through the task

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws

    def entry(self, entry: Entry) -> str:
        return ws_text(entry.id, entry.data)

    async def _send(self, text: str) -> None:
        try:
            # Waits for the socket to drain once aiohttp's writer passed its limit: the
            # bound on what a stalled reader makes us buffer.
            await self.ws.send_str(text)
        except (ConnectionError, RuntimeError) as exc:
            raise ClientGone from exc

    async def send(self, chunk: list[str]) -> None:
        for text in chunk:
            await self._send(text)

    async def send_live(self, live: Live) -> None:
        for frame in live.events():
            await self._send(frame.ws)  # encoded once per process by the hub, shared

    def write_now(self, live: Live) -> bool:
        return False

    async def gap(self, payload: wire.Gap) -> None:
        message = {"event_type": "gap", **payload}
        await self._send(json.dumps(message, ensure_ascii=False, separators=(",", ":")))

    async def keep_alive(self) -> None:
        return  # aiohttp's heartbeat sends the pings

    async def goodbye(self, retry_ms: int) -> None:
        await close(self.ws, WSCloseCode.GOING_AWAY, f"retry_ms={retry_ms}")


async def close(ws: web.WebSocketResponse, code: int, reason: str = "") -> None:
    """Close with `code`; a peer that does not answer in time is cut off."""
    try:
        await ws.close(code=code, message=reason.encode())
    except TimeoutError:
        pass  # aiohttp already closed the transport
    except (ConnectionError, RuntimeError):
        pass  # the peer is gone


def check_origin(request: web.Request) -> None:
    """Refuse a cross-site page riding on the `access_token` cookie (WebSocket has no CORS).

    Browsers send cookies with a WebSocket handshake from any site, and nothing like CORS
    keeps that site from reading the messages. A token in the header or query is not
    ambient, and without SUBSCRIBE_SECRET there is nothing to protect.
    """
    settings = request.app[app_keys.settings_key]
    if not settings.subscribe_secret:
        return
    if auth.bearer(request.headers.get("Authorization")) or request.query.get("access_token"):
        return
    origin = request.headers.get("Origin")
    if origin is None or "access_token" not in request.cookies:
        return
    if urlsplit(origin).netloc == request.host or cors.origin_allowed(
        origin, settings.cors_origins
    ):
        return
    request.app[app_keys.metrics_key].auth_failed("subscribe", "origin")
    raise Problem(
        403,
        f"origin {origin!r} may not use the access_token cookie here; add it to CORS_ORIGINS "
        "or pass ?access_token=",
        slug="websocket-origin-denied",
    )


async def websocket_events(request: web.Request) -> web.StreamResponse:
    """GET /api/v1/workflows/ws/{instance_id} and /workflows/{id}/ws: events as messages."""
    workflow_id = views.workflow_id_of(request)
    views.authorize_subscribe(request, workflow_id)
    start = views.start_id_of(request)
    check_origin(request)
    app = request.app
    settings, store = app[app_keys.settings_key], app[app_keys.store_key]
    ws = web.WebSocketResponse(
        heartbeat=settings.heartbeat_seconds,
        compress=False,  # per-socket deflate would undo the hub's encode-once
        autoclose=False,  # read_until_closed answers a close, echoing the client's code
        timeout=CLOSE_TIMEOUT,
        max_msg_size=MAX_CLIENT_MESSAGE,
    )
    if not ws.can_prepare(request).ok:
        raise Problem(
            426,
            "this endpoint speaks WebSocket; for a plain HTTP stream use "
            f"/workflows/{workflow_id}/events",
            headers={"Upgrade": "websocket"},
            slug="websocket-upgrade-required",
        )

    if start is not None and await views.finished_before(store, workflow_id, start):
        await ws.prepare(request)  # nothing left to send: the twin of SSE's 204
        connections.mark_started(request, ws)
        await close(ws, WSCloseCode.OK, "finished")
        return ws

    async with views.StreamSlot(request, workflow_id, "websocket") as (handle, sub):
        await ws.prepare(request)
        connections.mark_started(request, ws)
        await serve(ws, views.event_stream(request, WsSink(ws), sub, handle, start))
    return ws


async def serve(ws: web.WebSocketResponse, stream: EventStream) -> None:
    """Run the stream while reading the socket; whichever ends first ends both."""
    streaming = asyncio.create_task(stream.run(), name="ws-stream")
    reading = asyncio.create_task(read_until_closed(ws), name="ws-read")
    try:
        await asyncio.wait({streaming, reading}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await _cancel(streaming)
        # The reader goes first: a close() while it waits in receive() hands it a CLOSING
        # message, and aiohttp then cuts the transport at once instead of waiting for the
        # client's answer, so a client that was not reading at that moment saw 1006.
        await _cancel(reading)
        # After the terminal event: 1000. After goodbye (1001) or a client that left, the
        # socket is closed already and this does nothing.
        await close(ws, WSCloseCode.OK, "finished")
    if not streaming.cancelled() and (exc := streaming.exception()) is not None:
        if not isinstance(exc, RedisError):  # Redis outages are retried inside the stream
            logger.error("websocket stream of %s failed", stream.workflow_id, exc_info=exc)


async def read_until_closed(ws: web.WebSocketResponse) -> None:
    """Read (and ignore) what the client sends, so pongs and its close are seen."""
    while True:
        msg = await ws.receive()
        if msg.type is WSMsgType.CLOSE:
            # Echo the client's code (RFC 6455 5.5.1): answering 1000 to a client's 4000
            # would make its own close look like the end of the run.
            await close(ws, msg.data if _sendable(msg.data) else WSCloseCode.OK)
            return
        if msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return


def _sendable(code: object) -> bool:
    """A close code an endpoint may put on the wire (not 1005/1006/1015, not reserved)."""
    return isinstance(code, int) and (
        1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999
    )


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait for it, without swallowing a cancellation of our own."""
    if not task.done():
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)
