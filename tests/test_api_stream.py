"""Streaming over a real socket: framing, replay, resume, gaps, terminal end, hand-over."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from server import app_keys, redis_keys, store
from testing.events import DONE, started
from testing.http import publish
from testing.sse import Message, collect, iter_messages
from tests.conftest import Serve

pytestmark = pytest.mark.backends("fakeredis", "redis", "cluster")


async def read_messages(
    resp: aiohttp.ClientResponse, count: int, *, timeout: float = 10.0
) -> list[Message]:
    """The next `count` event messages (comments skipped) of an open stream."""
    out: list[Message] = []

    async def run() -> None:
        async for msg in iter_messages(resp):
            if msg.comment is None and msg.data:
                out.append(msg)
                if len(out) == count:
                    return

    await asyncio.wait_for(run(), timeout)
    return out


async def test_headers_and_exact_frame_bytes(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    (eid,) = await publish(base, wf, [started("n1", node_name="품질 판정")])
    ((_, fields),) = await redis.xrange(redis_keys.stream_key(wf))
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"{base}/workflows/{wf}/events", headers={"Accept-Encoding": "gzip, deflate"}
        ) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert "Content-Encoding" not in resp.headers
        expected = (
            b"retry: 3000\n\n"
            + f"id: {eid}\nevent: node_started\ndata: ".encode()
            + fields[b"d"]
            + b"\n\n"
        )
        got = await asyncio.wait_for(resp.content.readexactly(len(expected)), 5)
    assert got == expected
    # Raw UTF-8 on the wire, the same code points, never \uXXXX escapes.
    assert "품질 판정".encode() in got and b"\\u" not in got


async def test_replay_from_start_header_and_query_where_header_wins(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    ids = await publish(base, wf, [started(f"n{i}") for i in range(5)] + [DONE])
    url = f"{base}/workflows/{wf}/events"
    async with aiohttp.ClientSession() as s:
        assert [m.id for m in await collect(s, url)] == ids
        assert [m.id for m in await collect(s, url, headers={"Last-Event-ID": ids[1]})] == ids[2:]
        assert [m.id for m in await collect(s, f"{url}?lastEventId={ids[3]}")] == ids[4:]
        both = await collect(s, f"{url}?lastEventId={ids[3]}", headers={"Last-Event-ID": ids[0]})
        assert [m.id for m in both] == ids[1:]
        # An empty value counts as absent: an empty header leaves the query to decide.
        empty = await collect(s, f"{url}?lastEventId=", headers={"Last-Event-ID": ""})
        assert [m.id for m in empty] == ids
        query = await collect(s, f"{url}?lastEventId={ids[3]}", headers={"Last-Event-ID": ""})
        assert [m.id for m in query] == ids[4:]
        msgs = await collect(s, url)
    assert [m.event for m in msgs] == ["node_started"] * 5 + ["workflow_state_changed"]
    assert msgs[0].json()["node_id"] == "n0" and msgs[0].json()["workflow_id"] == wf


@pytest.mark.parametrize(
    "bad",
    [
        "abc",
        "1",
        "1-",
        "-1",
        "1-2-3",
        "1.5-0",
        "99999999999999999999999-0",
        "1-0 x",
        "18446744073709551616-0",
        "\u0661\u0662-0",
    ],  # 2**64; Arabic-Indic digits
)
async def test_malformed_last_event_id_is_400(
    serve: Serve, new_workflow: Callable[[], str], bad: str
) -> None:
    base, wf = await serve(), new_workflow()
    async with aiohttp.ClientSession() as s:
        for kwargs in ({"headers": {"Last-Event-ID": bad}}, {"params": {"lastEventId": bad}}):
            async with s.get(f"{base}/workflows/{wf}/events", **kwargs) as resp:  # type: ignore[arg-type]
                assert resp.status == 400
                assert resp.headers["Content-Type"].startswith("application/problem+json")
                assert (await resp.json(content_type=None))["status"] == 400


@pytest.mark.parametrize("bad", ["\x1f", "\x0b", "\x1c1-0"])
async def test_a_control_character_last_event_id_is_400_not_absent(
    serve: Serve, new_workflow: Callable[[], str], bad: str
) -> None:
    """str.strip() counts \x1c-\x1f and \x0b as whitespace: such an id must not be "empty"."""
    base, wf = await serve(), new_workflow()
    async with aiohttp.ClientSession() as s:
        for path in ("events", "ws"):  # the WebSocket route checks it before the upgrade
            url = f"{base}/workflows/{wf}/{path}"
            async with s.get(url, params={"lastEventId": bad}) as resp:
                assert resp.status == 400
                assert (await resp.json(content_type=None))["status"] == 400


async def test_workflow_without_events_waits_then_streams_live(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    async with aiohttp.ClientSession() as s, s.get(f"{base}/workflows/{wf}/events") as resp:
        assert resp.status == 200
        publisher = asyncio.create_task(publish(base, wf, [started("a"), DONE]))
        msgs = await read_messages(resp, 2)
        ids = await publisher
        assert [m.id for m in msgs] == ids
        assert await asyncio.wait_for(resp.content.read(), 5) == b""  # ended after terminal


async def test_terminal_ends_stream_and_reconnect_at_terminal_is_204(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    ids = await publish(base, wf, [started("a"), DONE, started("late")])
    url = f"{base}/workflows/{wf}/events"
    async with aiohttp.ClientSession() as s:
        # The stream ends at the terminal event, even though a resumed run follows.
        assert [m.id for m in await collect(s, url)] == ids[:2]
        # Not 204 while the last event is not terminal: the resumed run streams on.
        resumed = await publish(
            base, wf, [{"event_type": "workflow_state_changed", "to_state": "CANCELLED"}]
        )
        assert [m.id for m in await collect(s, url, headers={"Last-Event-ID": ids[1]})] == [
            ids[2],
            *resumed,
        ]
        for start in (resumed[0], "99999999999999-0"):
            async with s.get(url, headers={"Last-Event-ID": start}) as resp:
                assert resp.status == 204


async def test_when_redis_cannot_say_whether_to_answer_204_the_stream_decides_later(
    serve: Serve, new_workflow: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An overloaded Redis at reconnect time gives a 200 (a 503 would end an EventSource for
    good); the stream then ends at once if the client already had the terminal event."""
    base, wf = await serve(), new_workflow()
    ids = await publish(base, wf, [started("a"), DONE])
    the_store = serve.apps[0][app_keys.store_key]
    real_last_entry = the_store.last_entry
    failures = 0

    async def overloaded_once(workflow_id: str) -> store.Entry | None:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise RedisConnectionError("No connection available.")
        return await real_last_entry(workflow_id)

    monkeypatch.setattr(the_store, "last_entry", overloaded_once)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/workflows/{wf}/events", headers={"Last-Event-ID": ids[1]}) as r:
            assert r.status == 200
            body = await asyncio.wait_for(r.read(), 10)  # it ends by itself
        assert failures == 1 and b"data:" not in body
        async with s.get(f"{base}/workflows/{wf}/events", headers={"Last-Event-ID": ids[1]}) as r:
            assert r.status == 204  # Redis answers again: the usual 204


async def test_keep_alive_comment_when_idle(serve: Serve, new_workflow: Callable[[], str]) -> None:
    base, wf = await serve(heartbeat_seconds=0.2), new_workflow()
    async with aiohttp.ClientSession() as s, s.get(f"{base}/workflows/{wf}/events") as resp:
        seen: list[Message] = []

        async def first_comment() -> None:
            async for msg in iter_messages(resp):
                seen.append(msg)
                if msg.comment is not None:
                    return

        await asyncio.wait_for(first_comment(), 5)
    assert seen[-1].comment == "keep-alive"
    assert seen[0].retry == 3000


async def test_trimmed_history_is_announced_as_gap(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(history_maxlen=5), new_workflow()
    ids = await publish(base, wf, [started(f"n{i}") for i in range(9)] + [DONE])
    assert await redis.xlen(redis_keys.stream_key(wf)) == 5  # exact MAXLEN
    url = f"{base}/workflows/{wf}/events"
    async with aiohttp.ClientSession() as s:
        msgs = await collect(s, url, headers={"Last-Event-ID": ids[1]})
        gap, rest = msgs[0], msgs[1:]
        assert gap.event == "gap" and gap.id is None
        body = gap.json()
        assert body["requested"] == ids[1] and body["earliest_available"] == ids[5]
        assert (
            body["progress"]["workflow_id"] == wf and body["progress"]["last_event_id"] == ids[-1]
        )
        assert [m.id for m in rest] == ids[5:]
        # Nothing newer than the requested id was trimmed: no gap, nothing silent.
        assert [m.id for m in await collect(s, url, headers={"Last-Event-ID": ids[4]})] == ids[5:]
        # From the beginning means what is retained: no gap either.
        assert [m.id for m in await collect(s, url)] == ids[5:]


async def test_handover_stress_every_client_gets_exactly_the_stored_ids_after_its_start(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    """2,000 events as fast as possible while 20 clients join at random moments and ids."""
    base, wf = await serve(), new_workflow()
    url = f"{base}/workflows/{wf}/events"
    rng = random.Random(7)
    publisher = serve.apps[0][app_keys.publisher_key]
    published: list[str] = []

    async def publish_fast() -> None:
        # In-process, no await between events but Redis' own: as fast as it can.
        for i in range(2000):
            if i % 100 == 0:
                published.extend(
                    await publisher.publish_many(wf, [started(f"b{i}"), started(f"c{i}")])
                )
            else:
                published.append(await publisher.publish(wf, started(f"n{i}")))
        published.append(await publisher.publish(wf, DONE))

    async def client(session: aiohttp.ClientSession) -> tuple[str | None, list[str]]:
        await asyncio.sleep(rng.uniform(0, 1.5))
        start = rng.choice(published) if published and rng.random() < 0.7 else None
        headers = {"Last-Event-ID": start} if start else {}
        msgs = await collect(session, url, headers=headers, timeout=60)
        return start, [m.id for m in msgs if m.id]

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        pub = asyncio.create_task(publish_fast())
        results = await asyncio.gather(*(client(s) for _ in range(20)))
        await pub
    stored = [eid.decode() for eid, _ in await redis.xrange(redis_keys.stream_key(wf))]
    assert stored == published and len(stored) == 2021
    for start, got in results:
        expected = stored if start is None else stored[stored.index(start) + 1 :]
        assert got == expected, (start, len(got), len(expected))
    assert sum(1 for start, _ in results if start is not None) >= 5


async def test_max_streams_refuses_past_the_limit_with_503(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(max_streams=2), new_workflow()
    url = f"{base}/workflows/{wf}/events"
    async with aiohttp.ClientSession() as s:
        first, second = (
            await s.get(url),
            await s.get(f"{base}/workflows/{wf}/progress", headers={"Accept": "text/event-stream"}),
        )
        assert first.status == 200 and second.status == 404  # unknown: no slot taken
        held = await s.get(url)
        assert held.status == 200
        async with s.get(url) as third:
            assert third.status == 503 and third.headers["Retry-After"]
            body = await third.json(content_type=None)
            assert body["status"] == 503 and "MAX_STREAMS" in body["detail"]
        first.release()
        held.release()
        second.release()


async def test_max_streams_counts_event_progress_and_websocket_streams_alike(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(max_streams=3), new_workflow()
    await publish(base, wf, [started("a")])
    app = serve.apps[0]
    events = f"{base}/workflows/{wf}/events"
    progress = f"{base}/workflows/{wf}/progress"
    sse = {"Accept": "text/event-stream"}
    async with aiohttp.ClientSession() as s:
        held = [await s.get(events), await s.get(progress, headers=sse)]
        ws = await s.ws_connect(f"{base}/workflows/{wf}/ws")
        assert [r.status for r in held] == [200, 200]
        assert len(app[app_keys.streams_key].open) == 3
        for url, headers in ((events, {}), (progress, sse)):
            async with s.get(url, headers=headers) as refused:
                assert refused.status == 503
                assert refused.headers["Content-Type"].startswith("application/problem+json")
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused_ws:
            await s.ws_connect(f"{base}/workflows/{wf}/ws")
        assert refused_ws.value.status == 503
        await ws.close()  # a slot comes free when a stream ends
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while len(app[app_keys.streams_key].open) > 2:
            assert loop.time() < deadline, "the WebSocket's slot was not released"
            await asyncio.sleep(0.02)
        async with s.get(events) as again:
            assert again.status == 200
        for resp in held:
            resp.release()
