"""Hostile conditions for open streams: a late SUBSCRIBE confirmation, huge events held for
a stalled reader (issue 12, items 6 and 18). Real sockets, a real Redis and fakeredis."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import aiohttp
import pytest

from server import app_keys, connections, problems, redis_keys
from server.app import create_app
from server.fanout.hub import Hub
from server.fanout.ring import Channel, Frame
from server.settings import Settings
from server.throttle import Throttle
from testing.events import DONE
from testing.http import publish
from testing.raw_http import dechunk, open_stalled_reader, read_all
from testing.sse import Parser, iter_messages
from tests.conftest import Serve
from tests.test_hostile_connections import close, raw, read_until_closed, split_response

JSON = {"Content-Type": "application/json"}


@pytest.fixture
def held_confirmations(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, asyncio.Event]]:
    """Channels whose (S)SUBSCRIBE confirmation the hub gets only once the test sets the
    channel's event: a hub or Redis too loaded to answer in time."""
    held: dict[str, asyncio.Event] = {}
    dispatch = Hub._dispatch

    def late(hub: Hub, message: dict[str, Any], upstream: Any) -> None:
        name = message["channel"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        release = held.get(name)
        if message["type"] in ("subscribe", "ssubscribe") and release is not None:

            async def later() -> None:
                await release.wait()
                dispatch(hub, message, upstream)

            asyncio.get_running_loop().create_task(later())
            return
        dispatch(hub, message, upstream)

    monkeypatch.setattr(Hub, "_dispatch", late)
    yield held
    for release in held.values():
        release.set()


async def test_a_late_subscribe_confirmation_does_not_hold_back_a_finished_workflows_history(
    serve: Serve, new_workflow: Callable[[], str], held_confirmations: dict[str, asyncio.Event]
) -> None:
    base, wf = await serve(), new_workflow()
    ids = await publish(base, wf, [{"event_type": "node_started", "node_id": "a"}, DONE])
    held_confirmations[redis_keys.channel(wf)] = asyncio.Event()
    started = time.monotonic()
    got: list[str] = []
    async with aiohttp.ClientSession() as s, s.get(f"{base}/workflows/{wf}/events") as resp:
        assert resp.status == 200

        async def read() -> None:
            async for msg in iter_messages(resp):
                if msg.id is not None:
                    got.append(msg.id)

        # Before the fix: 200, then only keep-alives for as long as the confirmation is late.
        await asyncio.wait_for(read(), 8)
    assert got == ids
    assert time.monotonic() - started < 8


async def test_history_read_before_a_late_confirmation_is_read_again_after_it(
    serve: Serve, new_workflow: Callable[[], str], held_confirmations: dict[str, asyncio.Event]
) -> None:
    base, wf = await serve(), new_workflow()
    first = await publish(base, wf, [{"event_type": "node_started", "node_id": "a"}])
    release = held_confirmations[redis_keys.channel(wf)] = asyncio.Event()
    got: list[str] = []
    async with aiohttp.ClientSession() as s, s.get(f"{base}/workflows/{wf}/events") as resp:
        assert resp.status == 200
        messages = iter_messages(resp)

        async def next_id() -> str:
            async for msg in messages:
                if msg.id is not None:
                    return msg.id
            raise AssertionError("the stream ended")

        got.append(await asyncio.wait_for(next_id(), 8))  # the history, unconfirmed
        # Stored while the channel is unconfirmed: no live frame will ever carry it.
        unseen = await publish(base, wf, [{"event_type": "node_completed", "node_id": "a"}])
        release.set()
        got.append(await asyncio.wait_for(next_id(), 8))  # read again after the confirmation
        live = await publish(base, wf, [DONE])
        got.append(await asyncio.wait_for(next_id(), 8))  # and live from then on
    assert got == first + unseen + live


async def test_a_late_confirmation_does_not_hold_back_the_first_progress_object(
    serve: Serve, new_workflow: Callable[[], str], held_confirmations: dict[str, asyncio.Event]
) -> None:
    base, wf = await serve(), new_workflow()
    ids = await publish(base, wf, [{"event_type": "node_started", "node_id": "a"}])
    held_confirmations[redis_keys.channel(wf)] = asyncio.Event()
    headers = {"Accept": "text/event-stream"}
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{base}/workflows/{wf}/progress", headers=headers) as resp,
    ):
        assert resp.status == 200

        async def first() -> dict[str, Any]:
            async for msg in iter_messages(resp):
                if msg.event == "progress":
                    snap: dict[str, Any] = json.loads(msg.data)
                    return snap
            raise AssertionError("the stream ended")

        snap = await asyncio.wait_for(first(), 8)
    assert snap["last_event_id"] == ids[-1]


def big_event(i: int) -> dict[str, Any]:
    """A `node_progress` event just under MAX_EVENT_BYTES (64 KiB) as JSON."""
    return {
        "event_type": "node_progress",
        "node_id": f"n{i}",
        "fraction": 0.5,
        "message": "x" * (64 * 1024 - 200),
    }


def big_plan() -> dict[str, Any]:
    """A 10,000-node plan of about 3.5 MiB: the largest the SPEC's limits allow in kind."""
    return {
        "event_type": "workflow_planned",
        "nodes": [{"node_id": f"n{i}", "node_name": "y" * 330} for i in range(10_000)],
    }


async def test_a_stalled_reader_holds_at_most_client_queue_bytes_of_the_largest_events(
    serve: Serve, new_workflow: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    queue_bytes = 16 * 1024 * 1024  # the default CLIENT_QUEUE_BYTES
    held: list[int] = []  # the ring's bytes after each live frame came
    sizes: list[int] = []
    push = Channel.push

    def watched(chan: Channel, frame: Frame) -> None:
        push(chan, frame)
        held.append(chan.ring_bytes)
        sizes.append(frame.size)

    monkeypatch.setattr(Channel, "push", watched)
    base, wf = await serve(history_maxlen=1_000), new_workflow()
    hub = serve.apps[-1][app_keys.hub_key]
    stalled = await open_stalled_reader(base, f"/workflows/{wf}/events")
    url = f"{base}/workflows/{wf}/events"
    ids: list[str] = []
    try:
        async with aiohttp.ClientSession() as s:
            # The stalled stream is open and its channel confirmed: every event from here
            # on reaches the hub live.
            while not any(c.ready.is_set() for c in hub._channels.values()):
                await asyncio.sleep(0.01)
            for batch in (
                [[big_event(i) for i in range(j, j + 50)] for j in range(0, 400, 50)]
                + [[big_plan()] for _ in range(4)]
                + [[DONE]]
            ):
                body = io.BytesIO(json.dumps(batch).encode())  # a big body in one go warns
                async with s.post(url, data=body, headers=JSON) as resp:
                    assert resp.status == 201, await resp.text()
                    ids += (await resp.json())["ids"]
        # 400 frames of 64 KiB and 4 of 7 MiB (both encodings) came for the stalled
        # reader: the ring held the byte bound plus at most one frame, never all of them.
        assert len(sizes) == len(ids) and max(sizes) > 6 * 1024 * 1024
        assert max(held) <= queue_bytes + max(sizes), (max(held), max(sizes))
        # ... and the reader loses nothing: it catches up from Redis when it reads.
        raw = await read_all(stalled, timeout=60)
        head, _, body_bytes = raw.partition(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0]
        stream, parser = dechunk(body_bytes), Parser()
        got = [
            m.id
            for i in range(0, len(stream), 1 << 16)
            for m in parser.feed(stream[i : i + (1 << 16)])
            if m.id
        ]
        assert got == ids
    finally:
        stalled.close()


# -- an error after a stream's headers ---------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [TimeoutError("the read timed out"), RuntimeError("a bug in the stream")],
    ids=["answerable", "unexpected"],
)
async def test_an_error_after_the_headers_ends_each_stream_with_one_log_line_for_all(
    redis: Any,
    new_workflow: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
) -> None:
    """Once a stream's 200 is sent, a failure (here its history read) cannot become a
    problem+json answer: an answerable one (a TimeoutError is an OSError, 503) used to be
    written as a second HTTP response inside the open stream, which stayed open; an
    unexpected one was an "Error handling request" traceback per stream. Each stream's
    connection ends, the failure is logged once for all of them, and the server serves on."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(problems, "_throttle", Throttle(problems.logger))  # a fresh interval
    settings = Settings(heartbeat_seconds=0.3)
    wf = new_workflow()
    async with connections.serve(create_app(settings, redis=redis), settings) as srv:

        async def failing(*args: Any, **kwargs: Any) -> NoReturn:
            raise error

        monkeypatch.setattr(srv.app[app_keys.store_key], "read_after", failing)
        request = f"GET /workflows/{wf}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        streams = [await raw(srv.port, request) for _ in range(5)]
        try:
            results = await asyncio.gather(*(read_until_closed(r, 5) for r, _ in streams))
        finally:
            for _, writer in streams:
                close(writer)
        for data, _ in results:
            status, headers, body = split_response(data)
            assert status == 200 and headers["transfer-encoding"] == "chunked"
            # Cut, not answered again: no second status line, no problem, no last chunk.
            assert b"HTTP/1." not in body and b"problem" not in body, body
            assert body.startswith(b"d\r\nretry: 3000\n\n\r\n") and not body.endswith(b"0\r\n\r\n")
        async with aiohttp.ClientSession() as s, s.get(f"{srv.url}/healthz") as resp:
            assert resp.status == 200
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in lines] == [
        f"GET /workflows/{wf}/events failed after its response started"
        + (f" ({type(error).__name__}: {error})" if isinstance(error, OSError) else "")
        + "; connection closed"
    ]
    assert (lines[0].exc_info is not None) is not isinstance(error, OSError)
