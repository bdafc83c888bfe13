"""The WebSocket endpoints over a real socket with aiohttp's client: the SSE events as messages."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from server import app_keys, auth
from testing.events import DONE, completed, started
from testing.sse import collect
from tests.conftest import Serve


def ws_url(base: str, wf: str, route: str = "api", query: str = "") -> str:
    path = f"/api/v1/workflows/ws/{wf}" if route == "api" else f"/workflows/{wf}/ws"
    return base.replace("http://", "ws://") + path + query


async def publish(serve: Serve, wf: str, events: list[dict[str, Any]]) -> list[str]:
    """Through the running app's own publisher (the same path as HTTP)."""
    return await serve.apps[0][app_keys.publisher_key].publish_many(wf, events)


async def receive(
    ws: aiohttp.ClientWebSocketResponse, count: int, timeout: float = 10
) -> list[Any]:
    """The next `count` messages, parsed."""
    out: list[Any] = []
    async with asyncio.timeout(timeout):
        while len(out) < count:
            msg = await ws.receive()
            assert msg.type == WSMsgType.TEXT, (msg.type, msg.data, ws.close_code)
            out.append(json.loads(msg.data))
    return out


async def until_closed(
    ws: aiohttp.ClientWebSocketResponse, timeout: float = 30
) -> tuple[list[Any], int | None]:
    """Every message until the server closes; and the close code."""
    out: list[Any] = []
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type != WSMsgType.TEXT:
                assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED), (msg.type, msg.data)
                return out, ws.close_code
            out.append(json.loads(msg.data))


@pytest.mark.backends("fakeredis", "redis", "cluster")
@pytest.mark.parametrize("route", ["api", "workflows"])
async def test_ws_replays_then_goes_live_and_closes_1000_after_terminal(
    serve: Serve, new_workflow: Callable[[], str], route: str
) -> None:
    base, wf = await serve(), new_workflow()
    first = await publish(serve, wf, [started("a", node_name="품질 판정"), completed("a")])
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(base, wf, route)) as ws:
        history = await receive(ws, 2)
        assert [m["id"] for m in history] == first
        later = await publish(serve, wf, [started("b"), completed("b", duration_ms=5)])
        live = await receive(ws, 2)
        assert [m["id"] for m in live] == later
        (end,) = await publish(serve, wf, [DONE])
        rest, code = await until_closed(ws)
        assert [m["id"] for m in rest] == [end]
        assert code == 1000
        # The same objects as the SSE data, plus `id` (first), and the same ids.
        sse = await collect(s, f"{base}/workflows/{wf}/events")
    got = history + live + rest
    assert [m["id"] for m in got] == [m.id for m in sse]
    for message, frame in zip(got, sse, strict=True):
        assert next(iter(message)) == "id"
        assert {k: v for k, v in message.items() if k != "id"} == frame.json()
    assert got[0]["node_name"] == "품질 판정"


async def test_ws_sends_raw_utf8_text(serve: Serve, new_workflow: Callable[[], str]) -> None:
    base, wf = await serve(), new_workflow()
    await publish(serve, wf, [started("a", node_name="이상 탐지")])
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(base, wf)) as ws:
        msg = await asyncio.wait_for(ws.receive(), 5)
    assert "이상 탐지" in msg.data and "\\u" not in msg.data


async def test_ws_resumes_after_last_event_id(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    ids = await publish(serve, wf, [started(f"n{i}") for i in range(5)])
    url = ws_url(base, wf, query=f"?lastEventId={ids[1]}")
    async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
        got = await receive(ws, 3)
        assert [m["id"] for m in got] == ids[2:]
        (end,) = await publish(serve, wf, [DONE])
        rest, code = await until_closed(ws)
    assert [m["id"] for m in rest] == [end] and code == 1000
    metrics = serve.apps[0][app_keys.metrics_key].render().decode()
    assert "wfsse_replays_total 1.0" in metrics


async def test_ws_resume_at_the_terminal_event_closes_at_once(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    ids = await publish(serve, wf, [started("a"), DONE])
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(ws_url(base, wf, query=f"?lastEventId={ids[-1]}")) as ws:
            assert await until_closed(ws, timeout=5) == ([], 1000)
        # Without an id the finished run is replayed, then closed.
        async with s.ws_connect(ws_url(base, wf, "workflows")) as ws:
            got, code = await until_closed(ws, timeout=5)
    assert [m["id"] for m in got] == ids and code == 1000


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/api/v1/workflows/ws/bad%7Bid%7D", ""),
        ("/api/v1/workflows/ws/-dash-first", ""),
        ("/workflows/a:b/ws", ""),
        ("/api/v1/workflows/ws/ok-id", "?lastEventId=12"),
        ("/workflows/ok-id/ws", "?lastEventId=1-2-3"),
    ],
)
async def test_ws_bad_id_or_last_event_id_is_400_before_upgrading(
    serve: Serve, path: str, query: str
) -> None:
    base = await serve()
    url = base.replace("http://", "ws://") + path + query
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as failed:
            await s.ws_connect(url)
        assert failed.value.status == 400
        async with s.get(base + path + query) as resp:  # the body says why
            assert resp.status == 400
            assert resp.content_type == "application/problem+json"


async def test_plain_get_on_the_ws_endpoint_is_426(serve: Serve) -> None:
    base = await serve()
    async with aiohttp.ClientSession() as s, s.get(f"{base}/workflows/ok-id/ws") as resp:
        assert resp.status == 426
        assert resp.headers["Upgrade"] == "websocket"


async def test_ws_announces_trimmed_history_as_a_gap_message(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(history_maxlen=5), new_workflow()
    ids = await publish(serve, wf, [started(f"n{i}") for i in range(10)])
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(ws_url(base, wf, query=f"?lastEventId={ids[0]}")) as ws,
    ):
        gap, *events = await receive(ws, 6)
    assert gap["event_type"] == "gap" and "id" not in gap
    assert gap["requested"] == ids[0] and gap["earliest_available"] == ids[5]
    assert gap["progress"]["workflow_id"] == wf
    assert [m["id"] for m in events] == ids[5:]


async def test_ws_counts_open_sockets_and_frees_them_when_the_client_leaves(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    app = serve.apps[0]
    gauge = app[app_keys.metrics_key].open_streams.labels("websocket")
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(ws_url(base, wf)) as ws:
            await publish(serve, wf, [started("a")])
            await receive(ws, 1)
            assert gauge._value.get() == 1
            assert len(app[app_keys.streams_key].open) == 1
        async with asyncio.timeout(5):
            while (
                gauge._value.get()
                or app[app_keys.streams_key].open
                or app[app_keys.hub_key].channel_count
            ):
                await asyncio.sleep(0.02)


async def test_ws_echoes_the_close_code_of_a_client_that_leaves(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(base, wf)) as ws:
        await ws.close(code=4000, message=b"bye")
        assert ws.close_code == 4000  # not 1000, which would read as "the run is over"


async def test_ws_refuses_a_foreign_page_riding_on_the_cookie(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    secret = "s" * 32
    base, wf = (
        await serve(subscribe_secret=secret, cors_origins=("http://good.example",)),
        new_workflow(),
    )
    token = auth.mint(secret, [wf], 60)
    cookie = {"Cookie": f"access_token={token}"}

    async def status(url: str, headers: dict[str, str]) -> int:
        async with aiohttp.ClientSession() as s:
            try:
                async with s.ws_connect(url, headers=headers):
                    return 101
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

    url = ws_url(base, wf)
    assert await status(url, {"Origin": "http://evil.example", **cookie}) == 403
    assert await status(url, {"Origin": base, **cookie}) == 101  # the server's own page
    assert await status(url, {"Origin": "http://good.example", **cookie}) == 101  # CORS_ORIGINS
    assert await status(url + f"?access_token={token}", {"Origin": "http://evil.example"}) == 101
    assert await status(url, {}) == 401
    assert await status(ws_url(base, "other"), cookie) == 403
    assert await status(url, {"Authorization": f"Bearer {token}"}) == 101
    expired = auth.mint(secret, [wf], 60, now=time.time() - 120)
    assert await status(url, {"Authorization": f"Bearer {expired}"}) == 401


async def test_ws_shutdown_closes_1001_with_a_jittered_retry(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(retry_ms=1000), new_workflow()
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(base, wf)) as ws:
        await publish(serve, wf, [started("a")])
        await receive(ws, 1)
        serve.apps[0][app_keys.streams_key].shutdown()
        msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type == WSMsgType.CLOSE and msg.data == 1001
    reason = str(msg.extra)
    assert reason.startswith("retry_ms=") and 1000 <= int(reason[9:]) <= 2000


def small_receive_buffer(addr_info: Any) -> socket.socket:
    """A client socket whose kernel receive buffer is tiny, so a stall reaches the server."""
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    return sock


def server_write_buffers(serve: Serve) -> int:
    """Bytes the server holds unsent in its sockets' transports right now."""
    total = 0
    for server in serve.servers:
        assert server.runner is not None and server.runner.server is not None
        for handler in server.runner.server.connections:
            if handler.transport is not None:
                total += handler.transport.get_write_buffer_size()
    return total


@pytest.mark.backends("fakeredis", "redis", "cluster")
@pytest.mark.timeout(180)
async def test_ws_stalled_socket_stays_bounded_and_then_gets_everything_once(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    queue_bound = 64
    base, wf = await serve(client_queue_frames=queue_bound, heartbeat_seconds=120), new_workflow()
    app = serve.apps[0]
    hub = app[app_keys.hub_key]
    payload = {"blob": "x" * 2000}  # ~2 KB events: thousands of them outgrow any socket buffer
    total, batch = 3000, 100

    stalled_session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer)
    )
    async with aiohttp.ClientSession() as s, stalled_session:
        stalled = await stalled_session.ws_connect(ws_url(base, wf))  # and never reads, yet
        fast = await s.ws_connect(ws_url(base, wf, "workflows"))
        fast_reader = asyncio.create_task(until_closed(fast, timeout=120))
        while len(app[app_keys.streams_key].open) < 2:
            await asyncio.sleep(0.01)

        peaks = {"queue": 0, "buffered": 0}

        async def sample() -> None:
            while True:
                peaks["queue"] = max(peaks["queue"], hub.max_queue())
                peaks["buffered"] = max(peaks["buffered"], server_write_buffers(serve))
                await asyncio.sleep(0)

        sampler = asyncio.create_task(sample())
        ids: list[str] = []
        for start in range(0, total, batch):
            events = [completed(f"n{i}", output=payload) for i in range(start, start + batch)]
            ids += await publish(serve, wf, events)
            await asyncio.sleep(0.001)  # let the hub fan out and the sockets write
        ids += await publish(serve, wf, [DONE])

        # The fast client got everything meanwhile, while the stalled one still sleeps.
        fast_got, fast_code = await fast_reader
        assert [m["id"] for m in fast_got] == ids and fast_code == 1000
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        assert hub.overflows >= 1, "the stalled socket never filled: the test proved nothing"
        assert 0 < peaks["queue"] <= queue_bound, peaks
        # ~6 MB went out per client; the stalled one never held more than a few writer limits.
        assert peaks["buffered"] <= 512 * 1024, peaks

        stalled_got, stalled_code = await until_closed(stalled, timeout=120)
        assert [m["id"] for m in stalled_got] == ids  # everything, once, in order
        assert stalled_code == 1000
        await stalled.close()
        await fast.close()
    catchups = app[app_keys.metrics_key].slow_client_catchups_total._value.get()
    assert catchups >= 1


async def test_a_client_busy_when_the_run_ends_still_gets_a_clean_1000(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    """The server waits for the close handshake: a client that reads its socket only some
    time after the terminal event (busy elsewhere) must not find it cut (1006)."""
    base, wf = await serve(), new_workflow()
    await publish(serve, wf, [started("a")])
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(base, wf)) as ws:
        assert len(await receive(ws, 1)) == 1
        await publish(serve, wf, [DONE])
        await asyncio.sleep(0.3)  # the client is busy: the close frame waits in its buffer
        rest, code = await until_closed(ws)
    assert [m["event_type"] for m in rest] == ["workflow_state_changed"]
    assert code == 1000
