"""The append path: one round trip with a cached fold state, exact under concurrent writers."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from server import progress, redis_keys
from server.models import Event, event_adapter
from server.progress import parts
from server.store import Store

pytestmark = pytest.mark.backends("fakeredis", "redis", "cluster")

T0 = datetime(2026, 1, 22, 10, 0, tzinfo=UTC)


def ev(i: int, event_type: str, **fields: Any) -> Event:
    raw = {"event_type": event_type, "timestamp": T0 + timedelta(seconds=i), **fields}
    return event_adapter.validate_python(raw)


def plan(nodes: int) -> Event:
    return ev(0, "workflow_planned", nodes=[{"node_id": f"n{i}"} for i in range(nodes)])


def node_events(count: int, nodes: int, seed: int) -> list[Event]:
    rnd = random.Random(seed)
    kinds = ["node_started", "node_progress", "node_completed", "node_failed", "node_skipped"]
    out = []
    for i in range(count):
        kind = rnd.choice(kinds)
        extra: dict[str, Any] = {"node_id": f"n{rnd.randrange(nodes)}"}
        if kind == "node_progress":
            extra["fraction"] = 0.5
        if kind == "node_failed":
            extra["error"] = "boom"
        out.append(ev(i + 1, kind, **extra))
    return out


def new_store(redis: Any, **kw: Any) -> Store:
    return Store(redis, maxlen=10_000, retention_seconds=600, **kw)


async def stored_state(redis: Any, wf: str) -> tuple[bytes, dict[str, bytes]]:
    """The fold state in Redis, as (meta, node parts)."""
    loaded = await new_store(redis).load_progress(wf)
    assert loaded is not None
    return _parts(loaded.state)


def _parts(state: progress.FoldState) -> tuple[bytes, dict[str, bytes]]:
    return progress.dumps_meta(state), {
        n: progress.dumps_node(node) for n, node in sorted(state.nodes.items())
    }


async def replayed_state(redis: Any, wf: str) -> tuple[bytes, dict[str, bytes]]:
    """Fold of every stored event in stream order: what the stored state must equal."""
    state = progress.new_state()
    for _id, fields in await redis.xrange(redis_keys.stream_key(wf)):
        state = progress.fold(state, event_adapter.validate_json(fields[b"d"]))
    return _parts(state)


class CountingReads:
    """Counts the store's separate reads (the second round trip the cache saves)."""

    def __init__(self, s: Store) -> None:
        self.reads = 0
        inner = s._read

        async def counted(*args: Any) -> Any:
            self.reads += 1
            return await inner(*args)

        s._read = counted  # type: ignore[method-assign,assignment]


async def test_a_cached_append_reads_nothing_first_and_the_fold_is_exact(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    wf, s = new_workflow(), new_store(redis)
    counter = CountingReads(s)
    await s.append(wf, [plan(5)])
    assert counter.reads == 1  # a new workflow: one read
    for e in node_events(40, 5, seed=1):
        await s.append(wf, [e])
    await s.append(wf, [ev(99, "workflow_state_changed", to_state="COMPLETED")])
    assert counter.reads == 1  # everything else rode on the cached state
    assert await stored_state(redis, wf) == await replayed_state(redis, wf)


async def test_without_a_plan_the_known_parts_grow_instead_of_being_read_again(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    wf, a, b = new_workflow(), new_store(redis), new_store(redis)
    await a.append(wf, [ev(1, "node_started", node_id="x")])
    b_reads = CountingReads(b)
    await b.append(wf, [ev(2, "node_started", node_id="y")])  # stale for a now
    a_reads = CountingReads(a)
    await a.append(wf, [ev(3, "node_started", node_id="z")])  # conflict answer, no read
    assert a_reads.reads == 0
    await b.append(wf, [ev(4, "node_completed", node_id="y")])  # b's view is stale
    await b.append(wf, [ev(5, "node_completed", node_id="y")])
    await b.append(wf, [ev(6, "node_completed", node_id="x")])  # x was never read by b
    await b.append(wf, [ev(7, "node_completed", node_id="x")])
    assert b_reads.reads == 1 + 1  # its first append, and x (y came in the conflict answer)
    assert await stored_state(redis, wf) == await replayed_state(redis, wf)


@pytest.mark.parametrize("writers", [2, 3])
async def test_concurrent_writers_in_several_processes_keep_the_fold_exact(
    redis: Any, new_workflow: Callable[[], str], writers: int
) -> None:
    wf = new_workflow()
    stores = [new_store(redis) for _ in range(writers)]
    await stores[0].append(wf, [plan(6)])
    events = node_events(150, 6, seed=writers)
    rnd = random.Random(7)
    appended = [1]

    async def writer(k: int) -> None:
        for i in range(k, len(events), writers):
            s = stores[k] if rnd.random() < 0.8 else rnd.choice(stores)
            batch = [events[i]] if rnd.random() < 0.7 else [events[i], events[i]]
            result = await s.append(wf, batch)
            await asyncio.sleep(rnd.random() * 0.002)  # writers in step would starve one
            appended[0] += len(result.new_events)

    await asyncio.gather(*(writer(k) for k in range(writers)))
    # Two appends of one workflow at once in the same process, too.
    await asyncio.gather(*(stores[0].append(wf, [e]) for e in node_events(8, 6, seed=9)))
    await stores[1].append(wf, [ev(500, "workflow_state_changed", to_state="FAILED")])
    assert await redis.xlen(redis_keys.stream_key(wf)) == appended[0] + 8 + 1
    assert await stored_state(redis, wf) == await replayed_state(redis, wf)


async def test_a_big_plan_of_any_text_is_stored_exactly_and_a_smaller_one_drops_the_rest(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    """The progress parts go to the script as one JSON argument (a plan over THREAD_NODES
    through the worker thread): quotes, backslashes, control characters and Unicode come
    out of Redis as they went in, and every part of a node no longer planned is deleted."""
    texts = ["품질 판정", 'a "quote" and a \\', "tab\tnew\nline\x01\x7f", "\U0001f600", "[]{}"]
    nodes = [
        {
            "node_id": f"n{i} {texts[i % 5]}",
            "node_name": texts[(i + 1) % 5],
            "node_type": texts[(i + 2) % 5],
            "depends_on": [f"n{i - 1} {texts[(i - 1) % 5]}"],
        }
        for i in range(1, parts.THREAD_NODES + 500)
    ]
    wf, s = new_workflow(), new_store(redis)
    await s.append(wf, [ev(0, "workflow_planned", nodes=[{"node_id": "n0 " + texts[0]}, *nodes])])
    assert await stored_state(redis, wf) == await replayed_state(redis, wf)
    await s.append(wf, [ev(1, "workflow_planned", nodes=[{"node_id": "n0 " + texts[0]}])])
    assert await stored_state(redis, wf) == await replayed_state(redis, wf)
    fields = await redis.hkeys(redis_keys.progress_key(wf))
    assert sorted(f for f in fields if f.startswith(b"n:")) == [f"n:n0 {texts[0]}".encode()]


async def test_a_workflow_that_expired_and_came_back_is_not_mistaken_for_the_cached_one(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    wf, a, b = new_workflow(), new_store(redis), new_store(redis)
    await a.append(wf, [ev(1, "node_started", node_id="old")])
    await redis.delete(*redis_keys.workflow_keys(wf))  # as if it expired
    await asyncio.sleep(0.01)  # expiry takes RETENTION_SECONDS: the new ids are later
    await b.append(wf, [ev(2, "node_started", node_id="new")])  # ver is 1 again
    await a.append(wf, [ev(3, "node_completed", node_id="new")])
    assert await stored_state(redis, wf) == await replayed_state(redis, wf)
    meta = json.loads((await stored_state(redis, wf))[0])
    assert meta["tot"] == 1  # "old" is gone with the expired state


async def test_idempotency_keys_with_a_cached_state_store_once(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    wf, a, b = new_workflow(), new_store(redis), new_store(redis)
    first = await a.append(wf, [ev(1, "node_started", node_id="n", idempotency_key="k1")])
    again = await a.append(wf, [ev(1, "node_started", node_id="n", idempotency_key="k1")])
    assert again.ids == first.ids and again.new_events == []
    other = await b.append(wf, [ev(2, "node_completed", node_id="n", idempotency_key="k2")])
    mixed = await a.append(
        wf,
        [
            ev(2, "node_completed", node_id="n", idempotency_key="k2"),
            ev(3, "node_started", node_id="m", idempotency_key="k3"),
            ev(3, "node_started", node_id="m", idempotency_key="k3"),
        ],
    )
    assert mixed.ids[0] == other.ids[0] and mixed.ids[1] == mixed.ids[2]
    assert len(mixed.new_events) == 1
    assert await redis.xlen(redis_keys.stream_key(wf)) == 3
    assert await stored_state(redis, wf) == await replayed_state(redis, wf)


async def test_the_cache_stays_within_its_budget(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    s = new_store(redis, cache_nodes=30)
    workflows = [new_workflow() for _ in range(6)]
    for wf in workflows:
        await s.append(wf, [plan(5)])
        assert s.cache.weight <= 30
        assert s.cache.weight == sum(v.weight for v in s.cache.views.values())
    assert list(s.cache.views) == workflows[-3:]  # 9 each: the three written last
    big = new_workflow()
    await s.append(big, [plan(40)])  # heavier than the whole budget: not kept
    assert big not in s.cache.views
    for wf in workflows:
        await s.append(wf, [ev(1, "node_started", node_id="n1")])
        assert await stored_state(redis, wf) == await replayed_state(redis, wf)


async def test_saving_what_was_shown_neither_extends_nor_revives_a_workflow(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    wf, s = new_workflow(), Store(redis, maxlen=10_000, retention_seconds=60)
    await s.append(wf, [ev(1, "node_started", node_id="n")])
    key = redis_keys.progress_key(wf)
    await redis.pexpire(key, 5_000)  # as if the last event were 55 s old
    await s.save_shown(wf, b"shown")
    assert 0 < await redis.pttl(key) <= 5_000
    assert await redis.hget(key, "shown") == b"shown"
    gone = new_workflow()  # expired, or never known: a poll must not create its key
    await s.save_shown(gone, b"shown")
    assert await redis.exists(redis_keys.progress_key(gone)) == 0


async def test_two_writers_of_one_running_node_merge_and_fold_twice_once_at_most(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    """An engine's progress reports through two processes: their appends touch one node
    whose part none of them changes. The first append of each that finds the other's in
    between folds again (a workflow is not known to be shared until then); every later
    one is merged by the script."""
    wf, a, b = new_workflow(), new_store(redis), new_store(redis)
    await a.append(wf, [plan(3), ev(1, "node_started", node_id="n1")])
    step = iter(range(2, 10_000))

    async def writer(s: Store) -> None:
        for _ in range(15):
            batch = [ev(next(step), "node_progress", node_id="n1", fraction=0.5)] * 10
            await s.append(wf, batch)

    await asyncio.gather(writer(a), writer(b))
    assert a.refolded <= 1 and b.refolded <= 1
    assert a.merged + b.merged >= 10
    assert await redis.xlen(redis_keys.stream_key(wf)) == 2 + 300
    assert await stored_state(redis, wf) == await replayed_state(redis, wf)


def mixed_events(count: int, nodes: int, seed: int) -> list[Event]:
    """Node events, restarts after failures, non-terminal states and idempotency keys (some
    repeated), with timestamps out of order now and then."""
    rnd = random.Random(seed)
    out = node_events(count, nodes, seed)
    for i in range(0, count, 7):
        out[i] = ev(i + 1, "workflow_state_changed", to_state=rnd.choice(["RUNNING", "PAUSED"]))
    for i in range(3, count, 5):
        out[i] = out[i].model_copy(update={"idempotency_key": f"k{rnd.randrange(count // 3)}"})
    for i in range(5, count, 11):
        out[i] = out[i].model_copy(update={"timestamp": out[i - 4].timestamp})
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_merged_appends_of_three_writers_equal_the_serial_fold(
    redis: Any, new_workflow: Callable[[], str], seed: int
) -> None:
    wf = new_workflow()
    stores = [new_store(redis) for _ in range(3)]
    if seed != 2:  # without a plan, every node seen counts
        await stores[0].append(wf, [plan(8)])
    events = mixed_events(240, 10, seed)
    rnd = random.Random(seed)

    async def writer(k: int) -> None:
        for i in range(k, len(events), 6):
            await stores[k % 3].append(wf, events[i : i + rnd.choice([1, 2, 3])])  # overlapping

    await asyncio.gather(*(writer(k) for k in range(6)))
    assert sum(s.merged + s.refolded for s in stores) >= 1  # they did get in each other's way
    assert await stored_state(redis, wf) == await replayed_state(redis, wf)


async def test_a_merge_is_refused_when_the_node_or_the_plan_changed_under_the_fold(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    wf, a, b = new_workflow(), new_store(redis), new_store(redis)
    await a.append(wf, [ev(1, "node_started", node_id="x")])
    await b.append(wf, [ev(2, "node_started", node_id="y")])
    await a.append(wf, [ev(3, "node_progress", node_id="x", fraction=0.1)])
    assert (a.merged, a.refolded) == (0, 1)  # not yet known to be shared: no delta sent
    await b.append(wf, [ev(4, "node_completed", node_id="x")])  # x changed under a's view
    await a.append(wf, [ev(5, "node_failed", node_id="x", error="boom")])
    assert (a.merged, a.refolded) == (0, 2)
    await b.append(wf, [ev(6, "node_started", node_id="z")])  # nothing a's fold reads
    await a.append(wf, [ev(7, "node_started", node_id="x")])
    assert (a.merged, a.refolded) == (1, 2)
    assert await stored_state(redis, wf) == await replayed_state(redis, wf)

    wf, a, b = new_workflow(), new_store(redis), new_store(redis)
    await a.append(wf, [ev(1, "node_started", node_id="z1")])
    await b.append(wf, [ev(2, "node_started", node_id="z0")])
    await a.append(wf, [ev(3, "node_completed", node_id="z1")])
    assert (a.merged, a.refolded) == (0, 1)
    await b.append(wf, [plan(2)])  # plan_known changed: z1 no longer counts
    await a.append(wf, [ev(4, "node_started", node_id="z1")])
    assert (a.merged, a.refolded) == (0, 2)
    assert await stored_state(redis, wf) == await replayed_state(redis, wf)


async def test_a_failed_attempt_after_another_process_replanned_is_filed_under_the_new_definition(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    """A new plan with the same nodes changes no node's part, only the definition that the
    failed attempt's history item names: no merge then."""
    wf, a, b = new_workflow(), new_store(redis), new_store(redis)
    nodes = [{"node_id": "n0"}, {"node_id": "n1"}]
    await a.append(wf, [ev(0, "workflow_planned", nodes=nodes, definition_id="A")])
    await a.append(wf, [ev(1, "node_started", node_id="n0")])
    await b.append(wf, [ev(2, "node_started", node_id="n1")])
    await a.append(wf, [ev(3, "node_progress", node_id="n0", fraction=0.5)])
    assert (a.merged, a.refolded) == (0, 1)  # now known to be shared
    await b.append(wf, [ev(4, "workflow_planned", nodes=nodes, definition_id="B")])
    failed = await a.append(wf, [ev(5, "node_failed", node_id="n0", error="boom")])
    assert (a.merged, a.refolded) == (0, 2)
    assert [item[0] for item in failed.history] == ["B"]
    assert await stored_state(redis, wf) == await replayed_state(redis, wf)


async def test_merged_running_lists_keep_node_ids_of_any_text(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    """The script writes the merged running list itself: quotes, backslashes, slashes,
    control characters and Unicode in node ids come out as they went in."""
    ids = ['a "quote"', "back\\slash", "sl/ash", "tab\tnew\nline\x01", "품질 판정", "\U0001f600"]
    wf, a, b = new_workflow(), new_store(redis), new_store(redis)
    step = iter(range(1, 1000))

    async def writer(s: Store, nodes: list[str]) -> None:
        for node in nodes:  # start, report, fail, retry: one node after the other
            await s.append(wf, [ev(next(step), "node_started", node_id=node)])
            await s.append(wf, [ev(next(step), "node_progress", node_id=node, fraction=0.5)])
            await s.append(wf, [ev(next(step), "node_failed", node_id=node, error="boom")])
            await s.append(wf, [ev(next(step), "node_started", node_id=node)])

    await asyncio.gather(writer(a, ids[:3]), writer(b, ids[3:]))
    assert a.merged + b.merged >= 1
    assert await stored_state(redis, wf) == await replayed_state(redis, wf)
    running = json.loads((await stored_state(redis, wf))[0])["r"]
    assert sorted(running) == sorted(ids)
