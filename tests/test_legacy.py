"""LEGACY_INGEST: the original engine's PUBLISHes stored exactly once, however many servers run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

import aiohttp
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError

from server import app_keys, redis_keys
from server.legacy import (
    KEY_PREFIX,
    InvalidMessage,
    LegacyIngest,
    idempotency_key_of,
    legacy_key,
    parse_message,
)
from server.publisher import Publisher, assemble
from server.settings import Settings
from testing.metrics import sample
from testing.procs import RedisProcess, ServerProcess
from testing.sse import collect
from testing.waiting import wait_until
from tests.conftest import HISTORY_PREFIX, REDIS_URL, Serve, real_redis_or_skip


def now() -> str:
    return datetime.now(UTC).isoformat()


def original(instance_id: str, event_type: str, **fields: Any) -> dict[str, Any]:
    """An event as the original engine built it: `instance_id`, never `workflow_id`."""
    return {"event_type": event_type, "instance_id": instance_id, **fields, "timestamp": now()}


def run_of(instance_id: str, nodes: int) -> list[dict[str, Any]]:
    """A whole run the original way: RUNNING, each node started then completed, COMPLETED."""
    events = [
        original(instance_id, "workflow_state_changed", from_state="PENDING", to_state="RUNNING")
    ]
    for i in range(nodes):
        node = {"node_id": f"node_{i}", "node_name": f"단계 {i}", "node_type": "task"}
        events.append(original(instance_id, "node_started", **node))
        events.append(
            original(instance_id, "node_completed", **node, duration_ms=3, output={"rows": i})
        )
    events.append(
        original(instance_id, "workflow_state_changed", from_state="RUNNING", to_state="COMPLETED")
    )
    return events


def publish_original(redis_url: str, instance_id: str, event: dict[str, Any] | bytes) -> int:
    """What the seed's `_publish_to_redis` did: a plain PUBLISH of JSON on the old channel."""
    data = event if isinstance(event, bytes) else json.dumps(event)
    client = SyncRedis.from_url(redis_url)
    try:
        receivers: int = client.publish(f"workflow:{instance_id}:events", data)
        return receivers
    finally:
        client.close()


def publisher_for(redis: Any) -> Publisher:
    return assemble(Settings(history_prefix=HISTORY_PREFIX), redis)[2]


def validator(max_event_bytes: int = 64 * 1024) -> Publisher:
    """A publisher that is only asked to validate (parsing needs no Redis)."""
    return Publisher(cast(Any, None), max_event_bytes=max_event_bytes)


# Parsing, in-process ---------------------------------------------------------------------


def test_an_original_message_becomes_an_event_of_its_channel() -> None:
    raw = json.dumps(
        original("inst-1", "node_failed", node_id="n", node_name="이상 탐지", error="boom")
    ).encode()
    wf, event = parse_message(b"workflow:inst-1:events", raw, validator(), max_bytes=1 << 20)
    assert wf == "inst-1" and event.workflow_id == "inst-1"
    assert event.event_type == "node_failed" and event.node_name == "이상 탐지"
    assert event.idempotency_key == idempotency_key_of(raw)
    assert event.idempotency_key.startswith(KEY_PREFIX) and len(event.idempotency_key) <= 128


def test_a_message_keeps_its_own_idempotency_key_and_may_omit_instance_id() -> None:
    raw = json.dumps({"event_type": "node_started", "node_id": "n", "idempotency_key": "k1"})
    wf, event = parse_message("workflow:w:events", raw, validator(), max_bytes=1 << 20)
    assert (wf, event.idempotency_key, event.workflow_id) == ("w", "k1", "w")
    assert event.timestamp is not None  # filled on receipt, like any publish


@pytest.mark.parametrize(
    ("channel", "data", "reason"),
    [
        ("workflow:a:b:events", '{"event_type":"node_started","node_id":"n"}', "valid workflow id"),
        ("workflow:{x}:events", '{"event_type":"node_started","node_id":"n"}', "valid workflow id"),
        ("workflow::events", '{"event_type":"node_started","node_id":"n"}', "valid workflow id"),
        ("workflow:w:events", "not json", "not JSON"),
        ("workflow:w:events", b"\xff\xfe", "not JSON"),
        (
            "workflow:w:events",
            '{"event_type":"node_progress","node_id":"n","fraction":NaN}',
            "not JSON",
        ),
        ("workflow:w:events", "[1, 2]", "not a JSON object"),
        ("workflow:w:events", '{"event_type":"node_started","node_id":"\\udfff"}', "surrogate"),
        (
            "workflow:w:events",
            '{"event_type":"node_started","node_id":"n","instance_id":"v"}',
            "does not match",
        ),
        (
            "workflow:w:events",
            '{"event_type":"node_started","node_id":"n","instance_id":"w","workflow_id":"v"}',
            "differ",
        ),
        (
            "workflow:w:events",
            '{"event_type":"node_started","node_id":"n","workflow_id":"v"}',
            "workflow_id",
        ),
        ("workflow:w:events", '{"event_type":"node_exploded","node_id":"n"}', "event_type"),
        (
            "workflow:w:events",
            '{"event_type":"node_started","node_id":"n","colour":"red"}',
            "colour",
        ),
        ("workflow:w:events", '{"event_type":"node_failed","node_id":"n"}', "error"),
        (
            "workflow:w:events",
            '{"event_type":"node_completed","node_id":"n","duration_ms":"5"}',
            "duration_ms",
        ),
        # A naive timestamp (Python's utcnow().isoformat()) has no offset: the models refuse it.
        (
            "workflow:w:events",
            '{"event_type":"node_started","node_id":"n","timestamp":"2026-01-22T10:28:00.123456"}',
            "timestamp",
        ),
        (
            "workflow:w:events",
            '{"event_type":"node_started","node_id":"' + "x" * 300 + '"}',
            "node_id",
        ),
    ],
)
def test_invalid_messages_are_refused_with_a_reason(
    channel: str, data: str | bytes, reason: str
) -> None:
    with pytest.raises(InvalidMessage, match=reason):
        parse_message(channel, data, validator(), max_bytes=1 << 20)


def test_oversized_messages_are_refused() -> None:
    big = json.dumps({"event_type": "node_started", "node_id": "n", "node_name": "x" * 1000})
    with pytest.raises(InvalidMessage, match="over 512"):
        parse_message("workflow:w:events", big, validator(), max_bytes=512)
    with pytest.raises(InvalidMessage, match="larger than 100"):
        parse_message("workflow:w:events", big, validator(100), max_bytes=1 << 20)


# The bridge in-process, on both backends ------------------------------------------------


@pytest.mark.backends("fakeredis", "redis", "cluster")
async def test_two_bridges_store_each_message_once_and_refuse_invalid_ones(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    wf = new_workflow()
    counted = [0, 0]

    def counter(i: int) -> Callable[[], None]:
        def count() -> None:
            counted[i] += 1

        return count

    bridges = [LegacyIngest(redis, publisher_for(redis), on_invalid=counter(i)) for i in range(2)]
    for bridge in bridges:
        await bridge.start()
    try:
        for bridge in bridges:
            await asyncio.wait_for(bridge.ready.wait(), 5)
        events = run_of(wf, 5)
        channel = f"workflow:{wf}:events"
        for event in events[:3]:
            await redis.publish(channel, json.dumps(event))
        await redis.publish(channel, b"{not json")
        await redis.publish(channel, json.dumps({**events[3], "instance_id": "someone-else"}))
        for event in events[3:]:
            await redis.publish(channel, json.dumps(event))

        async def all_stored() -> bool:
            return bool(await redis.xlen(redis_keys.stream_key(wf)) >= len(events))

        await wait_until(all_stored, every=0.02)
        await wait_until(lambda: _done(bridges, len(events) + 2), every=0.02)
        rows = await redis.xrange(redis_keys.stream_key(wf))
        stored = [json.loads(fields[b"d"]) for _, fields in rows]
        assert [(e["event_type"], e.get("node_id")) for e in stored] == [
            (e["event_type"], e.get("node_id")) for e in events
        ]
        assert all(e["workflow_id"] == wf and "instance_id" not in e for e in stored)
        assert counted == [2, 2] and [b.invalid for b in bridges] == [2, 2]
        snap = await assemble(Settings(history_prefix=HISTORY_PREFIX), redis)[1].snapshot(wf)
        assert snap is not None
        assert (snap["state"], snap["completed_nodes"]) == ("COMPLETED", 5)
    finally:
        for bridge in bridges:
            await bridge.close()


async def _done(bridges: list[LegacyIngest], count: int) -> bool:
    return all(b.received >= count for b in bridges)


async def test_byte_identical_messages_are_one_event(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    """The documented caveat of deriving the key from the bytes."""
    wf = new_workflow()
    bridge = LegacyIngest(redis, publisher_for(redis))
    await bridge.start()
    try:
        await asyncio.wait_for(bridge.ready.wait(), 5)
        raw = json.dumps(original(wf, "node_started", node_id="n"))
        for _ in range(3):
            await redis.publish(f"workflow:{wf}:events", raw)
        await wait_until(lambda: _done([bridge], 3), every=0.02)
        assert await redis.xlen(redis_keys.stream_key(wf)) == 1
    finally:
        await bridge.close()


async def test_the_bridge_resubscribes_after_a_redis_restart() -> None:
    server = RedisProcess()
    server.start()
    client = Redis.from_url(server.url)
    bridge = LegacyIngest(client, publisher_for(client), max_backoff=0.2)
    try:
        await bridge.start()
        await asyncio.wait_for(bridge.ready.wait(), 5)
        await client.publish(
            "workflow:r1:events", json.dumps(original("r1", "node_started", node_id="a"))
        )
        await wait_until(lambda: _done([bridge], 1), every=0.02)
        server.kill()
        server.start()  # same port, empty: the bridge must find it and subscribe again
        raw = json.dumps(original("r1", "node_started", node_id="b"))
        async with asyncio.timeout(15):
            # Pub/sub keeps nothing for an absent subscriber: publish until it is back (the
            # same bytes each time, so however many arrive, one event is stored).
            while True:
                with contextlib.suppress(RedisError):
                    if await client.xlen(redis_keys.stream_key("r1")) == 1:
                        break
                    await client.publish("workflow:r1:events", raw)
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        assert await client.xlen(redis_keys.stream_key("r1")) == 1
    finally:
        await bridge.close()
        await client.aclose()
        server.kill()


async def test_a_server_with_legacy_ingest_streams_original_publishes_over_its_websocket(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    """Old engine in, old front end out: PUBLISH on the old channel, read the old socket."""
    base, wf = await serve(legacy_ingest=True), new_workflow()
    app = serve.apps[0]
    await asyncio.wait_for(app[legacy_key].ready.wait(), 5)
    events = run_of(wf, 3)
    url = base.replace("http://", "ws://") + f"/api/v1/workflows/ws/{wf}"
    async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
        for event in events:
            await redis.publish(f"workflow:{wf}:events", json.dumps(event))
        got = []
        async with asyncio.timeout(10):
            async for msg in ws:
                got.append(json.loads(msg.data))
        assert ws.close_code == 1000
    assert [(m["event_type"], m.get("node_id")) for m in got] == [
        (e["event_type"], e.get("node_id")) for e in events
    ]
    metrics = app[app_keys.metrics_key].render().decode()
    assert f"wfsse_events_published_total {float(len(events))}" in metrics


# The original call shapes on the Python publisher -----------------------------------------


async def test_emit_node_event_and_emit_state_change_publish_like_publish(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    wf = new_workflow()
    pub = publisher_for(redis)
    ids = [
        await pub.emit_state_change(wf, "PENDING", "RUNNING"),
        await pub.emit_node_event(wf, "node_started", "n1", node_name="품질 판정", node_type="llm"),
        await pub.emit_node_event(wf, "node_completed", "n1", duration_ms=12, output={"ok": True}),
        await pub.emit_node_event(wf, "node_failed", "n2", error="boom"),
        await pub.emit_state_change(wf, "RUNNING", "FAILED", reason="n2 failed"),
    ]
    rows = await redis.xrange(redis_keys.stream_key(wf))
    assert [r[0].decode() for r in rows] == ids
    stored = [json.loads(fields[b"d"]) for _, fields in rows]
    assert {k: v for k, v in stored[0].items() if k != "timestamp"} == {
        "workflow_id": wf,
        "event_type": "workflow_state_changed",
        "to_state": "RUNNING",
        "from_state": "PENDING",
    }
    assert stored[1]["node_name"] == "품질 판정" and "error" not in stored[1]
    assert stored[2]["output"] == {"ok": True} and stored[2]["duration_ms"] == 12
    assert stored[4]["reason"] == "n2 failed"


# Two real server processes on the real Redis ----------------------------------------------


def metric(text: str, name: str) -> float:
    value = sample(text, name)
    assert value is not None, f"{name} not in /metrics"
    return value


async def wait_subscribed(proc: ServerProcess, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while "legacy ingest subscribed" not in proc.output():
        assert time.monotonic() < deadline, proc.output()
        await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
async def test_two_servers_store_every_original_publish_once_and_survive_a_sigkill() -> None:
    real = await real_redis_or_skip()
    wf = "legacy-" + uuid.uuid4().hex[:12]
    env = {"REDIS_URL": REDIS_URL, "LEGACY_INGEST": "1", "HEARTBEAT_SECONDS": "1"}
    servers = [ServerProcess(env=env), ServerProcess(env=env)]
    try:
        await asyncio.gather(*(s.start() for s in servers))
        await asyncio.gather(*(wait_subscribed(s) for s in servers))
        victim, survivor = servers
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{survivor.url}/metrics") as resp:
                invalid_before = metric(await resp.text(), "wfsse_legacy_ingest_invalid_total")
            # The survivor's stream of the run, open from the start.
            reading = asyncio.create_task(
                collect(session, f"{survivor.url}/workflows/{wf}/events", timeout=60)
            )
            events = run_of(wf, 150)
            kill_at = len(events) // 2
            sent_at: list[float] = []
            killed_at = victim_stored = 0.0
            for i, event in enumerate(events):
                if i == kill_at:
                    async with session.get(f"{victim.url}/metrics") as resp:
                        victim_stored = metric(await resp.text(), "wfsse_events_published_total")
                    victim.signal(signal.SIGKILL)  # mid-run, no goodbye
                    killed_at = time.time()
                if i == 10:  # two invalid messages, refused by every process
                    await asyncio.to_thread(publish_original, REDIS_URL, wf, b"{not json")
                    bad = {**event, "event_type": "node_exploded"}
                    await asyncio.to_thread(publish_original, REDIS_URL, wf, bad)
                sent_at.append(time.time())
                await asyncio.to_thread(publish_original, REDIS_URL, wf, event)
                await asyncio.sleep(0.003)
            messages = await reading
            victim.wait(10)

            async with session.get(f"{survivor.url}/workflows/{wf}/progress") as resp:
                progress = await resp.json()
            async with session.get(f"{survivor.url}/metrics") as resp:
                text = await resp.text()
                invalid_after = metric(text, "wfsse_legacy_ingest_invalid_total")
                survivor_stored = metric(text, "wfsse_events_published_total")

        # Exactly once, in the published order, in the stream and in Redis.
        got = [m.json() for m in messages]
        assert [(e["event_type"], e.get("node_id")) for e in got] == [
            (e["event_type"], e.get("node_id")) for e in events
        ]
        assert len({m.id for m in messages}) == len(events)
        assert await real.xlen(redis_keys.stream_key(wf)) == len(events)
        assert progress["state"] == "COMPLETED" and progress["completed_nodes"] == 150
        assert progress["last_event_id"] == messages[-1].id
        assert invalid_after - invalid_before == 2

        # Failover: none. The survivor was ingesting every message all along, so events
        # published after the kill are stored as fast as before it.
        def delay(i: int) -> float:
            return int(str(messages[i].id).split("-")[0]) / 1000 - sent_at[i]

        before = max(delay(i) for i in range(kill_at))
        after = max(delay(i) for i in range(kill_at, len(events)))
        print(
            f"\nlegacy ingest, SIGKILL of one of two servers at t={killed_at:.3f}: worst "
            f"publish-to-store delay {before * 1000:.1f} ms before, {after * 1000:.1f} ms after; "
            f"first to store: victim {victim_stored:.0f} (until the kill), "
            f"survivor {survivor_stored:.0f}, of {len(events)}"
        )
        assert after < 1.0
    finally:
        for s in servers:
            s.stop()
        await real.delete(*redis_keys.workflow_keys(wf))
        await real.aclose()
