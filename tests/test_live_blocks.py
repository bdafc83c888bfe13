"""Live blocks: the append script publishes the events' SSE frames ready to send, one block
per message, so that every process reading the channel pays per message, not per event."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import aiohttp
import pytest

from server import app_keys, redis_keys, sse
from server.append_script import PUBLISH_BYTES
from server.fanout.ring import Frame
from server.fanout.upstream import parse_block
from server.metrics import NAMESPACE, Metrics
from server.store import id_key
from testing.events import completed, started, state
from testing.metrics import sample
from testing.rings import reader, ring
from testing.sse import Message, iter_messages
from tests.conftest import Serve


async def _blocks(pubsub: Any, wanted: int) -> list[bytes]:
    """The next `wanted` event messages of the channel (not the progress parts, `=`)."""
    got: list[bytes] = []
    async with asyncio.timeout(10):
        while len(got) < wanted:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None and not message["data"].startswith(b"="):
                got.append(message["data"])
    return got


async def _post(base: str, wf: str, events: list[dict[str, Any]]) -> list[str]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/workflows/{wf}/events", json=events) as resp:
            assert resp.status == 201, await resp.text()
            ids: list[str] = (await resp.json())["ids"]
            return ids


async def _next_event(messages: AsyncIterator[Message]) -> Message:
    async with asyncio.timeout(10):
        async for message in messages:
            if message.id:
                return message
    raise AssertionError("the stream ended")


async def _stored_frames(redis: Any, wf: str) -> list[bytes]:
    """Each stored event framed as the SSE stream's history frames it."""
    entries = await redis.xrange(redis_keys.stream_key(wf))
    return [sse.encode_event(eid, f[b"t"], f[b"d"]) for eid, f in entries]


async def test_a_block_holds_ready_frames_and_a_terminal_event_ends_it(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    pubsub = redis.pubsub()
    await pubsub.subscribe(redis_keys.channel(wf))
    try:
        # A run that completes and is resumed within one batch.
        ids = await _post(
            base, wf, [started("a"), completed("a"), state("COMPLETED"), started("b")]
        )
        raw = await _blocks(pubsub, 2)
    finally:
        await pubsub.aclose()
    assert all(r.startswith(b"#") for r in raw)
    blocks = [parse_block(r) for r in raw]
    keys = [id_key(i) for i in ids]
    assert [(b.first, b.key, b.id, b.count, b.terminal) for b in blocks] == [
        (keys[0], keys[2], ids[2], 3, True),
        (keys[3], keys[3], ids[3], 1, False),
    ]
    stored = await _stored_frames(redis, wf)
    assert [b.data for b in blocks] == [b"".join(stored[:3]), stored[3]]
    events = [e for b in blocks for e in b.events()]
    assert [(e.key, e.data, e.terminal) for e in events] == [
        (k, f, i == 2) for i, (k, f) in enumerate(zip(keys, stored, strict=True))
    ]
    assert all(e.ws.startswith('{"id":"' + i + '",') for e, i in zip(events, ids, strict=True))
    assert [json.loads(e.ws)["id"] for e in events] == ids


async def test_a_batch_bigger_than_a_message_is_published_in_blocks_of_the_bound(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    pubsub = redis.pubsub()
    await pubsub.subscribe(redis_keys.channel(wf))
    payload = "품질 판정 " * 30  # UTF-8: bytes, not characters, count
    events = [completed(f"n{i}", output={"text": payload}) for i in range(1000)]
    try:
        ids = await _post(base, wf, events)
        stored = await _stored_frames(redis, wf)
        wanted = -(-sum(map(len, stored)) // PUBLISH_BYTES)  # at least this many
        raw = await _blocks(pubsub, wanted)
        while sum(parse_block(r).count for r in raw) < len(ids):
            raw += await _blocks(pubsub, 1)
    finally:
        await pubsub.aclose()
    blocks = [parse_block(r) for r in raw]
    assert len(blocks) >= 5 and all(len(b.data) <= PUBLISH_BYTES for b in blocks)
    assert b"".join(b.data for b in blocks) == b"".join(stored)
    assert [e.id for b in blocks for e in b.events()] == ids
    assert all(b.first == b.events()[0].key and b.key == b.events()[-1].key for b in blocks)


async def test_a_message_of_an_unknown_format_resyncs_its_streams_and_keeps_the_connection(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    """What a newer writer may publish during a rolling upgrade: the streams read the
    events from Redis; the hub does not reconnect (which would refuse new streams)."""
    base, wf = await serve(), new_workflow()
    app = serve.apps[0]
    upstream = app[app_keys.hub_key]._upstreams["redis"]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/workflows/{wf}/events") as resp:
            messages = iter_messages(resp)
            first = await _post(base, wf, [started("a")])
            assert (await _next_event(messages)).id == first[0]
            pubsub = upstream.pubsub
            # A stored event whose live message this version cannot read.
            data = json.dumps({"event_type": "node_started", "workflow_id": wf, "node_id": "b"})
            fields = {"t": "node_started", "x": "0", "d": data}
            hidden = (await redis.xadd(redis_keys.stream_key(wf), fields)).decode()
            await redis.publish(redis_keys.channel(wf), b"@" + hidden.encode() + b" v9 frames")
            got = await _next_event(messages)
            assert (got.id, got.data) == (hidden, data)
            assert upstream.pubsub is pubsub and not upstream.down
            after = await _post(base, wf, [started("c")])
            assert (await _next_event(messages)).id == after[0]


def test_the_events_of_a_split_block_are_views_of_its_bytes() -> None:
    block = _block(range(4))
    events = block.events()
    views = [e.data for e in events]
    assert all(isinstance(v, memoryview) for v in views)
    assert len({id(cast(memoryview, v).obj) for v in views}) == 1  # one buffer, no copies
    assert b"".join(e.data for e in events) == block.data
    assert [bytes(e.json or b"") for e in events] == [b'{"node_id":"%d"}' % n for n in range(4)]
    assert block.events() is events  # split once


# The ring over blocks, without Redis.


def _block(seqs: range, terminal: bool = False) -> Frame:
    ids = [f"1769077817000-{i}" for i in seqs]
    frames = b"".join(
        sse.encode_event(i.encode(), b"node_started", b'{"node_id":"%d"}' % n)
        for n, i in zip(seqs, ids, strict=True)
    )
    head = f"#{ids[0]} {ids[-1]} {len(ids)} {int(terminal)}\n".encode()
    return parse_block(head + frames)


async def test_a_block_read_partly_from_history_goes_on_from_its_first_unsent_event() -> None:
    _, chan = ring(64)
    sub = reader(chan)
    first, second = _block(range(5)), _block(range(5, 8), terminal=True)
    chan.push(first)
    chan.push(second)
    live = sub.take()
    assert live is not None and live.count == 8 and live.terminal
    key = (1769077817000, 2)  # events 0..2 were sent from history
    rest = live.after(key)
    assert rest is not None and rest.count == 5 and rest.terminal and rest.stop == live.stop
    assert rest.sse == b"".join(e.data for e in first.events()[3:]) + second.data
    assert [e.id for e in rest.events()] == [f"1769077817000-{i}" for i in range(3, 8)]
    assert [e.terminal for e in rest.events()] == [False] * 4 + [True]
    only_second = live.after((1769077817000, 4))
    assert only_second is not None and only_second.frames == [second]
    assert live.after((1769077817000, 7)) is None and live.after((0, 0)) is live
    last_one = live.after((1769077817000, 6))
    assert last_one is not None and last_one.count == 1 and last_one.frames[0].terminal


async def test_the_ring_bound_counts_the_events_of_blocks() -> None:
    hub, chan = ring(10)
    slow, fast = reader(chan), reader(chan)
    chan.push(_block(range(6)))
    assert fast.take() is not None and chan.ring_events == 6
    chan.push(_block(range(6, 12)))  # 12 events held for `slow`: past the bound of 10
    assert slow.resync and hub.overflows == 1 and not fast.resync
    assert chan.ring_events == 6 and len(chan.ring) == 1  # the newest block is kept
    live = fast.take()
    assert live is not None and live.count == 6


def test_the_fanout_delay_counts_every_event_of_a_block() -> None:
    metrics = Metrics(process=False)
    metrics.observe_frames([_block(range(5))], now=1769077817.004)  # 4 ms after the first
    text, name = metrics.render().decode(), f"{NAMESPACE}_fanout_delay_seconds"
    assert sample(text, f"{name}_count") == 5
    assert sample(text, f"{name}_sum") == pytest.approx(5 * 0.004, abs=1e-6)
    assert sample(text, f"{name}_bucket", le="0.005") == 5
