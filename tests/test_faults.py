"""Faults for real: Redis restarted mid-stream, SIGTERM with open streams, a server SIGKILLed."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from typing import Any

import aiohttp

from server import publisher as publisher_mod
from server import redis_keys
from testing.cleanup import forget_everywhere
from testing.events import DONE, started
from testing.procs import ServerProcess, app_on_own_redis
from testing.redis_reads import stream_ids
from testing.sse import Message, iter_messages
from tests.conftest import REDIS_URL, real_redis_or_skip


async def post(
    s: aiohttp.ClientSession, base: str, wf: str, event: dict[str, Any]
) -> aiohttp.ClientResponse:
    async with s.post(f"{base}/workflows/{wf}/events", json=event) as resp:
        await resp.read()
        return resp


async def test_redis_restart_mid_stream_503_then_resume_without_loss_or_duplicates() -> None:
    received: list[Message] = []
    async with app_on_own_redis() as (base, wf, redis_proc, client):
        async with aiohttp.ClientSession() as s:
            before = [(await post(s, base, wf, started(f"a{i}"))) for i in range(5)]
            assert all(r.status == 201 for r in before)
            resp = await s.get(f"{base}/workflows/{wf}/events")
            got_first = asyncio.Event()

            async def read() -> None:
                async for msg in iter_messages(resp):
                    if msg.comment is None and msg.data:
                        received.append(msg)
                        if len(received) == 5:
                            got_first.set()

            reader = asyncio.create_task(read())
            await asyncio.wait_for(got_first.wait(), 10)

            redis_proc.kill()
            during = await post(s, base, wf, started("lost"))
            assert during.status == 503 and during.headers["Retry-After"]
            assert during.headers["Content-Type"].startswith("application/problem+json")
            async with s.get(f"{base}/readyz") as ready:
                assert ready.status == 503
            # A new stream is told Redis is down (SPEC: 503), with or without a start id.
            for headers in ({}, {"Last-Event-ID": received[-1].id or ""}):
                async with s.get(f"{base}/workflows/{wf}/events", headers=headers) as refused:
                    assert refused.status == 503 and refused.headers["Retry-After"]

            redis_proc.start()  # same port, empty: it kept nothing on disk
            deadline = time.monotonic() + 15
            while True:
                async with s.get(f"{base}/readyz") as ready:
                    if ready.status == 200:
                        break
                assert time.monotonic() < deadline, "readyz did not recover"
                await asyncio.sleep(0.1)
            after = []
            for i in range(5):
                r = await post(s, base, wf, started(f"b{i}"))
                assert r.status == 201
                after.append(r)
            assert (await post(s, base, wf, DONE)).status == 201
            await asyncio.wait_for(reader, 20)  # the stream stayed open and ends at terminal
            resp.release()

        stored = await stream_ids(client, redis_keys.stream_key(wf))
        # Redis kept nothing: the stream says so (its last id is gone) before the new events.
        gaps = [m for m in received if m.event == "gap"]
        assert [m.json()["requested"] for m in gaps] == [received[4].id]
        assert received[5] is gaps[0]
        events = [m for m in received if m.event != "gap"]
        ids = [m.id for m in events]
        assert len(ids) == len(set(ids)) == 11  # 5 before, 5 after, the terminal; no duplicate
        assert ids[5:] == stored  # after the restart: exactly what Redis now holds, in order
        assert [m.json()["node_id"] for m in events[:10]] == [f"a{i}" for i in range(5)] + [
            f"b{i}" for i in range(5)
        ]


async def test_sigterm_with_200_open_streams_ends_all_cleanly_within_5s() -> None:
    server = ServerProcess()
    await server.start()
    wf = "term-" + uuid.uuid4().hex[:8]
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            assert (await post(s, server.url, wf, started("a"))).status == 201
            responses = [await s.get(f"{server.url}/workflows/{wf}/events") for _ in range(180)]
            # Progress streams end the same way.
            responses += [
                await s.get(
                    f"{server.url}/workflows/{wf}/progress", headers={"Accept": "text/event-stream"}
                )
                for _ in range(20)
            ]
            assert all(r.status == 200 for r in responses)
            started_at = time.monotonic()
            server.signal(signal.SIGTERM)

            async def drain(resp: aiohttp.ClientResponse) -> list[int]:
                retries = [m.retry async for m in iter_messages(resp) if m.retry is not None]
                resp.release()
                return retries

            results = await asyncio.wait_for(asyncio.gather(*(drain(r) for r in responses)), 5)
            code = server.wait(5)
            elapsed = time.monotonic() - started_at
        assert code == 0 and elapsed < 5
        finals = [r[-1] for r in results]
        assert all(len(r) == 2 for r in results)  # the opening retry and the shutdown one
        assert all(f >= 3000 for f in finals) and len(set(finals)) > 50  # jittered
    finally:
        server.stop()
        await forget_everywhere([wf])


async def test_client_reconnects_to_second_server_after_sigkill_and_gets_every_event_once() -> None:
    real = await real_redis_or_skip()
    wf = "kill-" + uuid.uuid4().hex[:8]
    env = {"REDIS_URL": REDIS_URL}
    first, second = ServerProcess(env=env), ServerProcess(env=env)
    await first.start()
    await second.start()
    received: list[str] = []
    try:
        async with publisher_mod.connect(REDIS_URL) as publisher, aiohttp.ClientSession() as s:
            stop = asyncio.Event()

            async def publish() -> int:
                n = 0
                while not stop.is_set() and n < 3000:
                    await publisher.publish(wf, started(f"n{n}"))
                    n += 1
                    if n % 20 == 0:
                        await asyncio.sleep(0.005)  # an engine's pace, not synchronisation
                await publisher.publish(wf, DONE)
                return n

            pub = asyncio.create_task(publish())
            async with s.get(f"{first.url}/workflows/{wf}/events") as resp:
                try:
                    async for msg in iter_messages(resp):
                        if msg.id:
                            received.append(msg.id)
                            if len(received) == 200:
                                first.signal(signal.SIGKILL)
                except aiohttp.ClientPayloadError:
                    pass  # the server died mid-response
            cut = len(received)
            assert 200 <= cut
            headers = {"Last-Event-ID": received[-1]}
            async with s.get(f"{second.url}/workflows/{wf}/events", headers=headers) as resp:
                stop.set()
                async for msg in iter_messages(resp):
                    if msg.id:
                        received.append(msg.id)
            await pub
        stored = await stream_ids(real, redis_keys.stream_key(wf))
        assert received == stored  # every event exactly once, in order, across the kill
        assert len(received) > cut
    finally:
        first.stop()
        second.stop()
        await real.delete(*redis_keys.workflow_keys(wf))
        await real.aclose()


async def test_a_burst_of_300_streams_opening_at_once_all_get_200() -> None:
    """More streams than the Redis pool has connections queue for it instead of failing."""
    real = await real_redis_or_skip()
    await real.aclose()
    server = ServerProcess(env={"REDIS_URL": REDIS_URL})
    await server.start()
    wf = "burst-" + uuid.uuid4().hex[:8]
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            url = f"{server.url}/workflows/{wf}/events"
            responses = await asyncio.wait_for(
                asyncio.gather(*(s.get(url) for _ in range(300))), 30
            )
            assert [r.status for r in responses] == [200] * 300
            for r in responses:
                r.release()
    finally:
        server.stop()
