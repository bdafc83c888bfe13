"""Hostile publishing: many concurrent writers to one workflow, over real sockets."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from server import progress, redis_keys, store
from server.app import create_app
from server.models import event_adapter
from server.settings import Settings
from server.store import Store
from testing.metrics import sample
from testing.procs import RedisProcess
from testing.redis_reads import stream_entries
from tests.conftest import Serve

pytestmark = pytest.mark.backends("fakeredis", "redis", "cluster")

WRITERS = 200


def plan(n: int) -> dict[str, Any]:
    return {"event_type": "workflow_planned", "nodes": [{"node_id": f"n{i}"} for i in range(n)]}


async def post_all(
    session: aiohttp.ClientSession, urls: list[str], bodies: list[Any]
) -> list[tuple[int, str, Any]]:
    """POST every body at once (one connection each), answers in input order."""

    async def one(url: str, body: Any) -> tuple[int, str, Any]:
        async with session.post(url, json=body) as resp:
            text = await resp.text()
            return resp.status, resp.content_type, json.loads(text) if text else None

    return await asyncio.gather(*(one(u, b) for u, b in zip(urls, bodies, strict=True)))


async def check_all_stored(redis: Any, wf: str, answers: list[tuple[int, str, Any]]) -> None:
    """Every answer is a 201 whose id holds exactly the event it was sent with."""
    failures = [a for a in answers if a[0] != 201]
    assert not failures, f"{len(failures)} of {len(answers)} failed, e.g. {failures[:3]}"
    rows = await redis.xrange(redis_keys.stream_key(wf))
    by_id = {eid.decode(): json.loads(fields[b"d"]) for eid, fields in rows}
    node_of_answer = [by_id[body["ids"][0]]["node_id"] for _, _, body in answers]
    assert node_of_answer == [f"n{i}" for i in range(len(answers))]
    ids = [eid.decode() for eid, _ in rows]
    assert ids == sorted(ids, key=store.id_key) and len(set(ids)) == len(ids)


async def test_two_hundred_concurrent_publishers_to_one_workflow_all_succeed(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    url = f"{base}/workflows/{wf}/events"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(url, json=plan(WRITERS)) as resp:
            assert resp.status == 201
        bodies = [
            {"event_type": "node_completed", "node_id": f"n{i}", "duration_ms": i}
            for i in range(WRITERS)
        ]
        answers = await post_all(session, [url] * WRITERS, bodies)
        await check_all_stored(redis, wf, answers)
        async with session.get(f"{base}/workflows/{wf}/progress") as resp:
            progress = await resp.json()
    # The fold saw every event exactly once, whatever the interleaving.
    assert progress["completed_nodes"] == WRITERS
    assert progress["percentage"] == 100.0


async def test_concurrent_publishers_on_two_server_processes_all_succeed(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    # Two apps with their own stores: each process's view of the fold goes stale whenever
    # the other writes, so this is the compare-and-set path under contention.
    bases, wf = [await serve(), await serve()], new_workflow()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(f"{bases[0]}/workflows/{wf}/events", json=plan(WRITERS)) as r:
            assert r.status == 201
        urls = [f"{bases[i % 2]}/workflows/{wf}/events" for i in range(WRITERS)]
        bodies = [{"event_type": "node_started", "node_id": f"n{i}"} for i in range(WRITERS)]
        answers = await post_all(session, urls, bodies)
        await check_all_stored(redis, wf, answers)
        async with session.get(f"{bases[1]}/workflows/{wf}/progress") as resp:
            progress = await resp.json()
    assert progress["running_nodes"] == WRITERS


async def test_two_processes_reporting_progress_of_one_node_merge_instead_of_refolding(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    """The engine's progress reports for one running node, spread over two server
    processes: each append finds the other's in between. After the first such append of
    each process (folded again), the append script merges them, while progress stays the
    serial fold of what is stored."""
    bases, wf = [await serve(), await serve()], new_workflow()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        first = [plan(2), {"event_type": "node_started", "node_id": "n0"}]
        async with session.post(f"{bases[0]}/workflows/{wf}/events", json=first) as r:
            assert r.status == 201
        report = {"event_type": "node_progress", "node_id": "n0", "fraction": 0.5}

        async def lane(base: str) -> list[int]:  # one after the other, as an engine sends
            statuses = []
            for _ in range(30):
                async with session.post(f"{base}/workflows/{wf}/events", json=[report] * 5) as r:
                    statuses.append(r.status)
            return statuses

        assert list(await asyncio.gather(lane(bases[0]), lane(bases[1]))) == [[201] * 30] * 2
        merged = refolded = 0.0
        for base in bases:
            async with session.get(f"{base}/metrics") as resp:
                text = await resp.text()
            merged += sample(text, "wfsse_appends_merged_total") or 0.0
            refolded += sample(text, "wfsse_appends_refolded_total") or 0.0
        async with session.get(f"{bases[1]}/workflows/{wf}/progress") as resp:
            shown = await resp.json()
    assert merged >= 10 and refolded <= 2, (merged, refolded)
    assert await redis.xlen(redis_keys.stream_key(wf)) == 2 + 300
    assert (shown["running_nodes"], shown["completed_nodes"], shown["total_nodes"]) == (1, 0, 2)
    stored = await Store(redis, maxlen=10_000, retention_seconds=60).load_progress(wf)
    assert stored is not None
    replayed = progress.new_state()
    for _id, fields in await redis.xrange(redis_keys.stream_key(wf)):
        replayed = progress.fold(replayed, event_adapter.validate_json(fields[b"d"]))
    for state in (stored.state, replayed):  # the hash keeps no node order
        state.nodes = dict(sorted(state.nodes.items()))
    assert progress.dumps_state(stored.state) == progress.dumps_state(replayed)


async def test_concurrent_retries_of_one_idempotency_key_store_it_once(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    url = f"{base}/workflows/{wf}/events"
    event = {"event_type": "node_started", "node_id": "n0", "idempotency_key": "k-1"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        answers = await post_all(session, [url] * 50, [event] * 50)
    assert {a[0] for a in answers} == {201}
    assert len({a[2]["ids"][0] for a in answers}) == 1
    assert await redis.xlen(redis_keys.stream_key(wf)) == 1


async def test_a_publish_answered_503_by_a_frozen_redis_is_not_stored_when_it_thaws() -> None:
    """SIGSTOP with the append in Redis's socket buffer: the 503 must stay true after SIGCONT,
    so a client that retries (as Retry-After invites) stores the event exactly once."""
    proc = RedisProcess()
    proc.start()
    assert proc.proc is not None
    url = proc.url + "?socket_timeout=1"
    server = TestServer(create_app(Settings(redis_url=url)), host="127.0.0.1")
    await server.start_server()
    base, wf = str(server.make_url("")).rstrip("/"), "frozen-" + uuid.uuid4().hex[:8]
    events_url = f"{base}/workflows/{wf}/events"
    first = {"event_type": "node_started", "node_id": "a"}
    retried = {"event_type": "node_completed", "node_id": "a"}  # no idempotency key
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(events_url, json=first) as resp:
                assert resp.status == 201
            proc.proc.send_signal(signal.SIGSTOP)
            async with s.post(events_url, json=retried) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"]
                assert resp.content_type == "application/problem+json"
                problem = await resp.json()
            assert problem["type"] == "/problems/outcome-unknown"
            assert "idempotency_key" in problem["detail"]
            proc.proc.send_signal(signal.SIGCONT)
            async with Redis.from_url(proc.url) as client:
                for _ in range(3):  # Redis reads the buffered script before answering these
                    assert await client.ping()
                assert await client.xlen(redis_keys.stream_key(wf)) == 1
                async with s.post(events_url, json=retried) as resp:  # the client's retry
                    assert resp.status == 201
                rows = await stream_entries(client, redis_keys.stream_key(wf))
            assert [json.loads(f[b"d"])["event_type"] for _, f in rows] == [
                "node_started",
                "node_completed",
            ]
    finally:
        proc.proc.send_signal(signal.SIGCONT)
        await server.close()
        proc.kill()


async def test_idempotency_keys_are_bounded_while_recent_retries_still_store_nothing(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    # HISTORY_MAXLEN=10 used to keep every key of the retention window beside 10 events.
    base, wf = await serve(history_maxlen=10), new_workflow()
    url = f"{base}/workflows/{wf}/events"
    total = store.IDEMPOTENCY_KEYS + 500
    async with aiohttp.ClientSession() as s:
        for start in range(0, total, 1000):
            batch = [
                {
                    "event_type": "node_progress",
                    "node_id": "n",
                    "fraction": 0.5,
                    "idempotency_key": f"k{i}",
                }
                for i in range(start, min(start + 1000, total))
            ]
            async with s.post(url, json=batch) as resp:
                assert resp.status == 201
        assert await redis.hlen(redis_keys.idempotency_key(wf)) == store.IDEMPOTENCY_KEYS
        assert await redis.llen(redis_keys.idempotency_order_key(wf)) == store.IDEMPOTENCY_KEYS
        assert await redis.xlen(redis_keys.stream_key(wf)) == 10
        last = await redis.xrevrange(redis_keys.stream_key(wf), count=1)
        recent = {
            "event_type": "node_progress",
            "node_id": "n",
            "fraction": 0.5,
            "idempotency_key": f"k{total - 1}",
        }
        async with s.post(url, json=recent) as resp:
            assert resp.status == 201
            assert (await resp.json())["ids"] == [last[0][0].decode()]  # the first id
    assert await redis.xrevrange(redis_keys.stream_key(wf), count=1) == last  # nothing new
