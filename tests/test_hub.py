"""The hub: one pub/sub connection per process, bounded memory, no loss for slow readers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import fakeredis
import pytest

from server import app_keys, redis_keys
from server.fanout.ring import Frame, Live
from server.fanout.upstream import parse_message, parse_messages
from server.redis_client import open_redis
from testing.events import DONE, started
from testing.raw_http import dechunk, open_stalled_reader, read_all
from testing.rings import reader, ring
from testing.sse import Parser, collect, iter_messages
from testing.waiting import wait_until
from tests.conftest import Serve


async def test_200_streams_on_50_workflows_share_one_pubsub_connection(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base = await serve()
    hub = serve.apps[0][app_keys.hub_key]
    workflows = [new_workflow() for _ in range(50)]
    channels = [redis_keys.channel(wf) for wf in workflows]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        responses = []
        for i in range(200):
            resp = await s.get(f"{base}/workflows/{workflows[i % 50]}/events")
            assert resp.status == 200
            responses.append(resp)
        assert hub.channel_count == 50
        numsub = dict(await redis.pubsub_numsub(*channels))
        assert all(numsub[c.encode()] == 1 for c in channels), numsub
        if not isinstance(redis, fakeredis.FakeAsyncRedis):  # the real server: its client list
            clients = await redis.client_list(_type="pubsub")
            holding = [c for c in clients if int(c["sub"]) == 51]  # 50 channels + control
            assert len(holding) == 1, clients
        # Every stream gets its workflow's events through that one connection.
        publisher = serve.apps[0][app_keys.publisher_key]
        for wf in workflows:
            await publisher.publish(wf, DONE)
        for i, resp in enumerate(responses):
            msgs = [m async for m in iter_messages(resp) if m.comment is None and m.data]
            assert [m.json()["workflow_id"] for m in msgs] == [workflows[i % 50]]
            resp.release()

    async def unsubscribed() -> bool:
        numsub = dict(await redis.pubsub_numsub(*channels))
        return hub.channel_count == 0 and all(v == 0 for v in numsub.values())

    await wait_until(unsubscribed, every=0.02)


async def test_stalled_reader_is_bounded_does_not_delay_others_and_loses_nothing(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(client_queue_frames=64), new_workflow()
    app = serve.apps[0]
    hub, publisher = app[app_keys.hub_key], app[app_keys.publisher_key]
    stalled = await open_stalled_reader(base, f"/workflows/{wf}/events")
    payload = "x" * 1024
    n = 6000  # ~6.5 MB: more than the kernel's socket buffers can hide
    try:
        async with aiohttp.ClientSession() as s:
            await wait_until(lambda: _true(hub.channel_count == 1), every=0.02)
            reader = asyncio.create_task(collect(s, f"{base}/workflows/{wf}/events", timeout=120))
            await wait_until(
                lambda: _true(sum(1 for _ in app[app_keys.streams_key].open) == 2), every=0.02
            )
            peak = 0
            for i in range(n):
                await publisher.publish(
                    wf,
                    {
                        "event_type": "node_progress",
                        "node_id": f"n{i % 40}",
                        "fraction": 0.5,
                        "message": payload,
                    },
                )
                peak = max(peak, hub.max_queue())
            await publisher.publish(wf, DONE)
            fast = await reader
            # The other client got everything while the stalled one had read nothing.
            assert len(fast) == n + 1
            assert peak <= 64  # the bound on each subscriber's live queue
            assert hub.overflows >= 1  # the stalled one was sent to catch up from the stream
        raw = await read_all(stalled, timeout=120)
    finally:
        stalled.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"200 OK" in head
    # Chunked transfer encoding: strip the chunk framing before parsing SSE.
    msgs = Parser().feed(dechunk(body))
    ids = [m.id for m in msgs if m.id]
    stored = [eid.decode() for eid, _ in await redis.xrange(redis_keys.stream_key(wf))]
    assert ids == stored and len(ids) == n + 1


async def _true(value: bool) -> bool:
    return value


@pytest.mark.backends("cluster")
async def test_on_a_cluster_one_sharded_subscription_per_shard_serves_every_workflow(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base = await serve()
    app = serve.apps[0]
    hub, publisher = app[app_keys.hub_key], app[app_keys.publisher_key]
    workflows = [new_workflow() for _ in range(30)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        readers = [
            asyncio.create_task(collect(s, f"{base}/workflows/{wf}/events")) for wf in workflows
        ]
        await wait_until(lambda: _true(hub.channel_count == 30), every=0.02)
        shards = {redis.get_node_from_key(redis_keys.channel(wf)).name for wf in workflows}
        assert hub.connection_count == len(shards) == 3  # 30 workflows, 3 connections
        for wf in workflows:
            await publisher.publish(wf, DONE)
        results = await asyncio.gather(*readers)
    assert [[m.json()["workflow_id"] for m in msgs] for msgs in results] == [
        [wf] for wf in workflows
    ]


# The live ring of one channel, without Redis: what readers take, share and lose.


def _frame(seq: int, terminal: bool = False) -> Frame:
    kind = "workflow_state_changed" if terminal else "node_started"
    return parse_message(f"1769077817000-{seq} {kind} {int(terminal)} {{}}".encode())


async def test_readers_at_one_position_share_one_joined_write() -> None:
    _, chan = ring(8)
    first, second = reader(chan), reader(chan)
    for i in range(3):
        chan.push(_frame(i))
    await asyncio.sleep(0)  # the pass's flush wakes the readers
    assert first.wakeup.flag and second.wakeup.flag
    a, b = first.take(), second.take()
    assert a is not None and a is b  # built once, joined once
    assert [f.id for f in a.frames] == [f"1769077817000-{i}" for i in range(3)]
    assert a.sse == b"".join(_frame(i).data for i in range(3))
    assert first.take() is None and not first.pending
    chan.push(_frame(3))
    await asyncio.sleep(0)  # everyone took 0..2: the pass's flush forgets them
    assert len(chan.ring) == 1


async def test_a_reader_a_whole_ring_behind_is_sent_to_catch_up_others_are_not() -> None:
    hub, chan = ring(4)
    slow, fast = reader(chan), reader(chan)
    for i in range(10):
        chan.push(_frame(i))
        live = fast.take()
        assert live is not None and [f.id for f in live.frames] == [f"1769077817000-{i}"]
    assert len(chan.ring) <= 4  # the bound holds with a stalled reader
    assert slow.resync and hub.overflows == 1 and not fast.resync
    assert slow.take() is None  # it reads Redis instead
    slow.restart()
    chan.push(_frame(10))
    live = slow.take()
    assert live is not None and [f.id for f in live.frames] == ["1769077817000-10"]


async def test_take_stops_after_the_terminal_frame_and_after_drops_what_history_sent() -> None:
    _, chan = ring(8)
    sub = reader(chan)
    for i, terminal in enumerate([False, False, True, False]):
        chan.push(_frame(i, terminal))
    live = sub.take()
    assert live is not None and live.terminal
    assert [f.id for f in live.frames] == [f"1769077817000-{i}" for i in range(3)]
    rest = live.after(_frame(0).key)  # 0 was sent from history already
    assert rest is not None and [f.id for f in rest.frames] == [
        f"1769077817000-{i}" for i in (1, 2)
    ]
    assert rest.sse == b"".join((_frame(1).data, _frame(2, True).data)) and rest.stop == live.stop
    assert live.after(_frame(2).key) is None and live.after((0, 0)) is live


async def test_a_fresh_cluster_client_takes_concurrent_first_commands(cluster_url: str) -> None:
    """redis-py's lazy cluster initialisation fails some concurrent first commands; the
    server's client learns the slots when it opens."""
    url = cluster_url.replace("redis://", "redis+cluster://", 1)
    for _ in range(3):
        async with open_redis(url) as client:
            keys_ = [redis_keys.stream_key(f"fresh-{i}") for i in range(20)]
            replies = await asyncio.gather(
                *(client.xrevrange(k, count=1) for k in keys_), return_exceptions=True
            )
            assert replies == [[]] * 20


async def test_a_notify_only_reader_holds_no_frames_and_never_counts_as_slow() -> None:
    hub, chan = ring(4)
    progress = reader(chan)
    progress.notify_only = True  # a progress stream: it only wants to know that something came
    for i in range(10):
        chan.push(_frame(i))  # no loop pass in between: the ring's bound trims it
        assert len(chan.ring) <= 4
    await asyncio.sleep(0)
    assert len(chan.ring) == 0 and hub.overflows == 0 and not progress.resync
    assert progress.pending and progress.wakeup.flag  # it still learns that something changed


class _Writer:
    """A stream parked in direct mode: records what the hub writes, or refuses."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.got: list[list[str]] = []

    def write_now(self, live: Live, now: float) -> bool:
        if self.accept:
            self.got.append([f.id for f in live.frames])
        return self.accept


async def test_a_parked_stream_is_written_once_per_loop_pass_without_waking_its_task() -> None:
    _, chan = ring(8)
    parked, woken = reader(chan), reader(chan)
    writer = _Writer()
    parked.direct = writer
    for i in range(3):
        chan.push(_frame(i))
    assert writer.got == []  # not yet: frames that arrive together go out together
    await asyncio.sleep(0)
    assert not parked.wakeup.flag and woken.wakeup.flag  # once, for the three
    assert writer.got == [[f"1769077817000-{i}" for i in range(3)]]
    assert parked.cursor == chan.seq and parked.direct is writer and not parked.pending
    chan.push(_frame(3))
    await asyncio.sleep(0)
    assert writer.got[-1] == ["1769077817000-3"]
    live = woken.take()  # the other reader's task takes all four itself
    assert live is not None and len(live.frames) == 4


async def test_a_parked_stream_that_refuses_or_must_resync_goes_back_to_its_task() -> None:
    _, chan = ring(8)
    refusing, resyncing = reader(chan), reader(chan)
    unwritten = _Writer()
    refusing.direct, resyncing.direct = _Writer(accept=False), unwritten
    resyncing.resync = True
    chan.push(_frame(0))
    await asyncio.sleep(0)
    for sub in (refusing, resyncing):
        assert sub.direct is None and sub.wakeup.flag  # handed back, woken
    assert unwritten.got == []
    live = refusing.take()  # nothing was lost: the task writes it with back-pressure
    assert live is not None and [f.id for f in live.frames] == ["1769077817000-0"]
    assert resyncing.take() is None  # it re-reads Redis first


@pytest.mark.parametrize("version", ["1.0", "1.1"])
async def test_live_frames_written_by_the_hub_are_framed_for_the_clients_http_version(
    serve: Serve, redis: Any, new_workflow: Callable[[], str], version: str
) -> None:
    """HTTP/1.1 gets chunked transfer encoding, HTTP/1.0 the bare stream until close."""
    base, wf = await serve(), new_workflow()
    app = serve.apps[0]
    hub, publisher = app[app_keys.hub_key], app[app_keys.publisher_key]
    parts = urlsplit(base)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        request = (
            f"GET /workflows/{wf}/events HTTP/{version}\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        writer.write(request.encode())

        async def parked() -> bool:  # caught up: the hub writes what follows to the socket
            chan = hub._channels.get(redis_keys.channel(wf))
            return chan is not None and any(sub.direct for sub in chan.subs)

        await wait_until(parked, every=0.02)
        for i in range(5):
            await publisher.publish(wf, started(f"n{i}"))
        await publisher.publish(wf, DONE)
        raw = await asyncio.wait_for(reader.read(), 10)  # the server ends the response
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert (b"transfer-encoding: chunked" in head.lower()) == (version == "1.1")
    msgs = Parser().feed(dechunk(body) if version == "1.1" else body)
    stored = [eid.decode() for eid, _ in await redis.xrange(redis_keys.stream_key(wf))]
    assert [m.id for m in msgs if m.id] == stored and len(stored) == 6
    assert msgs[-1].event == "workflow_state_changed"


def test_a_batched_live_message_frames_each_line_as_a_single_message_would() -> None:
    lines = [
        b'1769077817000-0 node_started 0 {"node_id":"\xed\x92\x88\xec\xa7\x88"}',
        b'1769077817000-1 node_progress 0 {"m":"a\rb"}',  # a CR: encode()'s slow path
        b"1769077817001-12 workflow_state_changed 1 {}",
    ]
    got = parse_messages(b"\n".join(lines))
    want = [parse_message(line) for line in lines]
    fields = [(f.key, f.id, f.data, f.json, f.terminal) for f in got]
    assert fields == [(f.key, f.id, f.data, f.json, f.terminal) for f in want]
    assert got[2].key == (1769077817001, 12) and got[2].terminal
