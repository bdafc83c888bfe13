"""Several processes appending to one workflow: each keeps its cached fold state current
from what the others' appends publish (Store.follow), and the stored state stays exact."""

from __future__ import annotations

import asyncio
import random
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from server import redis_keys, store
from server.fanout.hub import Hub
from server.store import Store
from testing.procs import ServerProcess
from testing.sse import iter_messages
from tests.conftest import REDIS_URL, real_redis_or_skip
from tests.test_store import ev, new_store, node_events, plan, replayed_state, stored_state

pytestmark = pytest.mark.backends("fakeredis", "redis")


class Attempts:
    """Counts the append scripts a store sends, and those that lost the compare-and-set."""

    def __init__(self, s: Store) -> None:
        self.sent = self.lost = 0
        inner = s._try

        async def counted(*args: Any, **kw: Any) -> Any:
            done = await inner(*args, **kw)
            self.sent += 1
            self.lost += not isinstance(done, store._Written)
            return done

        s._try = counted  # type: ignore[method-assign]


class Published:
    """The `=` messages of a workflow's channel as the hub hands them over, in order."""

    def __init__(self, follower: Store | None) -> None:
        self.follower = follower
        self.messages: list[bytes] = []
        self.arrived = asyncio.Condition()

    async def __call__(self, workflow_id: str, message: bytes) -> None:
        if self.follower is not None:
            self.follower.follow(workflow_id, message)
        async with self.arrived:
            self.messages.append(message)
            self.arrived.notify_all()

    def hook(self, workflow_id: str, message: bytes) -> None:
        asyncio.get_running_loop().create_task(self(workflow_id, message))

    async def wait_for(self, count: int) -> None:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.messages) >= count), 5)


@asynccontextmanager
async def followed(redis: Any, wf: str, follower: Store | None) -> AsyncIterator[Published]:
    """A hub attached to `wf`, handing its `=` messages to `follower` and the Published."""
    published = Published(follower)
    hub = Hub(redis, queue_limit=1024, on_state=published.hook)
    await hub.start()
    try:
        sub = await hub.attach(wf)
        await asyncio.wait_for(sub.channel.ready.wait(), 5)
        yield published
    finally:
        await hub.close()


async def test_a_follower_appends_after_another_process_without_losing_a_compare_and_set(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    wf, a, b = new_workflow(), new_store(redis), new_store(redis)
    async with followed(redis, wf, a) as published:
        await a.append(wf, [plan(6)])  # no `=` message: a plan rewrites every part
        attempts = Attempts(a)
        events = node_events(60, 6, seed=3)
        for i in range(0, len(events), 6):
            await b.append(wf, events[i : i + 3])  # b's view is stale: a conflict
            await published.wait_for(2 * (i // 6) + 1)  # b's, after a's and b's before
            await a.append(wf, events[i + 3 : i + 6])
        # a heard of each of b's appends before its own: every script of a won at once.
        assert (attempts.sent, attempts.lost) == (10, 0)
        assert await stored_state(redis, wf) == await replayed_state(redis, wf)


async def test_a_missed_write_drops_the_view_and_costs_a_retry_not_a_wrong_state(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    wf, a, b = new_workflow(), new_store(redis), new_store(redis)
    async with followed(redis, wf, None) as published:
        await a.append(wf, [ev(1, "node_started", node_id="x")])
        await b.append(wf, [ev(2, "node_started", node_id="y")])
        await b.append(wf, [ev(3, "node_completed", node_id="x")])
        await published.wait_for(3)
        a.follow(wf, published.messages[2])  # the second of b's, without the first
        assert wf not in a.cache.views
        await a.append(wf, [ev(4, "node_progress", node_id="x", fraction=0.5)])
        a.follow(wf, b"=1 2 x")  # not this version's form: forgotten, the hub unharmed
        assert wf not in a.cache.views
        attempts = Attempts(a)
        await a.append(wf, [ev(5, "node_completed", node_id="x")])
        assert attempts.lost == 0  # read afresh
        assert await stored_state(redis, wf) == await replayed_state(redis, wf)


async def test_a_write_over_a_state_of_the_same_version_but_another_last_id_is_not_followed(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    # The workflow's keys expired and it began again: its version numbers repeat, its ids
    # do not. A view of the old run must not take the new run's writes.
    wf, a, b = new_workflow(), new_store(redis), new_store(redis)
    async with followed(redis, wf, None) as published:
        await a.append(wf, [ev(1, "node_started", node_id="x")])
        await a.append(wf, [ev(2, "node_completed", node_id="x")])
        await redis.delete(*redis_keys.workflow_keys(wf))
        await b.append(wf, [ev(3, "node_started", node_id="y")])
        await b.append(wf, [ev(4, "node_started", node_id="z")])  # version 2 again
        await b.append(wf, [ev(5, "node_completed", node_id="y")])  # written over it
        await published.wait_for(5)
        a.follow(wf, published.messages[-1])
        assert wf not in a.cache.views
        await a.append(wf, [ev(6, "node_completed", node_id="z")])
        assert await stored_state(redis, wf) == await replayed_state(redis, wf)


async def test_reads_asked_together_share_one_round_trip(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    wf, s = new_workflow(), new_store(redis)
    ids = (await s.append(wf, node_events(20, 3, seed=5))).ids
    pipelines = 0
    inner = s.redis.pipeline

    def counted(*args: Any, **kw: Any) -> Any:
        nonlocal pipelines
        pipelines += 1
        return inner(*args, **kw)

    s.redis = type("Counted", (), {"pipeline": staticmethod(counted)})()
    pages = await asyncio.gather(*(s.read_after(wf, ids[4], 100) for _ in range(5)))
    assert pipelines == 1
    assert all([e.id for e in p.entries] == ids[5:] for p in pages)
    later = await s.read_after(wf, ids[4], 100)  # asked after that read was sent: its own
    assert pipelines == 2 and [e.id for e in later.entries] == ids[5:]


async def _stream(url: str, wf: str, ready: asyncio.Event, into: list[str]) -> None:
    """Collect the ids of one stream until the terminal event; `ready` once live."""
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{url}/workflows/{wf}/events", timeout=aiohttp.ClientTimeout(total=60)) as resp,
    ):
        assert resp.status == 200
        async for message in iter_messages(resp):
            if message.id is None:  # the `retry:` field
                continue
            into.append(message.id)
            ready.set()
            if message.event == "workflow_state_changed":
                return


@pytest.mark.backends("redis")
async def test_two_server_processes_appending_to_one_workflow_at_once_store_it_exactly(
    redis: Any,
) -> None:
    real = await real_redis_or_skip()
    await real.aclose()
    servers = [ServerProcess(env={"REDIS_URL": REDIS_URL}) for _ in range(2)]
    wf = "follow-" + uuid.uuid4().hex[:8]
    try:
        await asyncio.gather(*(srv.start() for srv in servers))
        seen: list[list[str]] = [[], []]
        ready = [asyncio.Event(), asyncio.Event()]
        readers = [
            asyncio.create_task(_stream(srv.url, wf, ready[i], seen[i]))
            for i, srv in enumerate(servers)
        ]
        async with aiohttp.ClientSession() as s:

            async def post(url: str, body: Any) -> list[str]:
                async with s.post(f"{url}/workflows/{wf}/events", json=body) as resp:
                    assert resp.status == 201, await resp.text()
                    ids: list[str] = (await resp.json())["ids"]
                    return ids

            await post(servers[0].url, {"event_type": "node_started", "node_id": "n0"})
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 10)
            rnd = random.Random(11)

            async def lane(k: int) -> None:
                for i in range(30):
                    batch = []
                    for j in range(rnd.randrange(1, 8)):
                        kind = rnd.choice(["node_started", "node_progress", "node_completed"])
                        event: dict[str, Any] = {
                            "event_type": kind,
                            "node_id": f"n{rnd.randrange(12)}",
                            "idempotency_key": f"L{k}-{i}-{j}",
                        }
                        if kind == "node_progress":
                            event["fraction"] = 0.5
                        batch.append(event)
                    first = await post(servers[k % 2].url, batch)
                    if i % 5 == 0:  # a retry through the other process stores nothing new
                        assert await post(servers[(k + 1) % 2].url, batch) == first

            await asyncio.gather(*(lane(k) for k in range(6)))
            await post(
                servers[1].url, {"event_type": "workflow_state_changed", "to_state": "COMPLETED"}
            )
        await asyncio.wait_for(asyncio.gather(*readers), 30)
        stored = [
            raw.decode() if isinstance(raw, bytes) else raw
            for raw, _ in await redis.xrange(redis_keys.stream_key(wf))
        ]
        assert seen[0] == stored and seen[1] == stored  # none lost, none twice, in order
        assert await stored_state(redis, wf) == await replayed_state(redis, wf)
        progress_ = [await _progress(srv.url, wf) for srv in servers]
        assert progress_[0] == progress_[1]
    finally:
        for srv in servers:
            srv.end(signal.SIGTERM)  # a clean exit deletes its watcher counts
            srv.stop()
        await redis.delete(*redis_keys.workflow_keys(wf))


async def _progress(url: str, wf: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/workflows/{wf}/progress") as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
    keep = ("total_nodes", "completed_nodes", "running_nodes", "state", "last_event_id")
    return {k: body[k] for k in keep}
