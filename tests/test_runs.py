"""The run index over the wire: GET /workflows ordering, filters, cursors, expiry, auth."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from server import auth, redis_keys, wire
from server.overview import runs
from testing.events import plan, started, state
from testing.http import publish
from tests.conftest import Serve

pytestmark = pytest.mark.backends("fakeredis", "redis", "cluster")

SECRET = "sub-" + "s" * 60
SUMMARY_KEYS = wire.keys(wire.RunSummary)  # checked against the SPEC in test_metrics_openapi


async def listing(
    base: str, headers: dict[str, str] | None = None, /, **query: str
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{base}/workflows", params=query, headers=headers or {}) as resp,
    ):
        return resp.status, json.loads(await resp.read())


async def walk(base: str, limit: int, **query: str) -> list[str]:
    """Every page of a walk, following `next`; the ids in the order listed."""
    ids: list[str] = []
    params = {"limit": str(limit), **query}
    while True:
        status, body = await listing(base, **params)
        assert status == 200, body
        assert len(body["workflows"]) <= limit
        ids += [w["workflow_id"] for w in body["workflows"]]
        if body["next"] is None:
            return ids
        params["cursor"] = body["next"]


async def later() -> None:
    """Let the clock move on a millisecond, so two index writes cannot share one."""
    start = time.time()
    while time.time() - start < 0.002:
        await asyncio.sleep(0.001)


async def test_most_recently_updated_first_with_the_progress_figures(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base = await serve()
    definition = "def-" + uuid.uuid4().hex[:8]
    wfs = [new_workflow() for _ in range(3)]
    for wf in wfs:
        await publish(base, wf, [plan(definition, "a", "b"), state("RUNNING"), started("a")])
        await later()
    status, body = await listing(base, definition_id=definition)
    assert status == 200
    assert [w["workflow_id"] for w in body["workflows"]] == wfs[::-1]
    assert body["next"] is None
    # An update moves a run to the top (a state change always writes the index).
    await publish(base, wfs[0], [{"event_type": "node_completed", "node_id": "a"}, state("PAUSED")])
    _, body = await listing(base, definition_id=definition)
    assert [w["workflow_id"] for w in body["workflows"]] == [wfs[0], wfs[2], wfs[1]]
    top = body["workflows"][0]
    assert set(top) == SUMMARY_KEYS
    async with aiohttp.ClientSession() as s, s.get(f"{base}/workflows/{wfs[0]}/progress") as resp:
        snap = await resp.json()
    for key in SUMMARY_KEYS - {"definition_id", "watchers", "estimated_remaining_seconds"}:
        assert top[key] == snap[key], key
    assert top["definition_id"] == definition
    assert (top["state"], top["completed_nodes"], top["percentage"]) == ("PAUSED", 1, 50.0)
    assert top["watchers"] == 0


async def test_state_and_definition_filters(serve: Serve, new_workflow: Callable[[], str]) -> None:
    base = await serve()
    one, two = "def-" + uuid.uuid4().hex[:8], "def-" + uuid.uuid4().hex[:8]
    running, done, failed, other = (new_workflow() for _ in range(4))
    await publish(base, running, [plan(one, "a"), state("RUNNING")])
    await publish(base, done, [plan(one, "a"), state("RUNNING"), state("COMPLETED")])
    await publish(base, failed, [plan(one, "a"), state("FAILED")])
    await publish(base, other, [plan(two, "a"), state("RUNNING")])
    ids = set(await walk(base, 50, definition_id=one))
    assert ids == {running, done, failed}
    assert set(await walk(base, 50, definition_id=one, state="RUNNING")) == {running}
    assert set(await walk(base, 50, definition_id=one, state="COMPLETED,FAILED")) == {done, failed}
    assert set(await walk(base, 50, definition_id=two, state="RUNNING")) == {other}
    running_anywhere = set(await walk(base, 200, state="RUNNING"))
    assert {running, other} <= running_anywhere and not {done, failed} & running_anywhere
    # A run that moves to another state leaves the old filter and enters the new one.
    await publish(base, running, [state("CANCELLED")])
    assert set(await walk(base, 50, definition_id=one, state="RUNNING")) == set()
    assert running in set(await walk(base, 50, definition_id=one, state="CANCELLED"))


async def test_a_walk_lists_every_run_once_while_runs_keep_changing(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    """Cursor paging is a snapshot as of the first page: runs updated meanwhile (which
    jump to the top) are listed once, where they stood, and none is skipped."""
    bases = [await serve(), await serve()]  # two processes writing the same runs
    definition = "def-" + uuid.uuid4().hex[:8]
    wfs = [new_workflow() for _ in range(40)]
    for wf in wfs:
        await publish(random.choice(bases), wf, [plan(definition, "a"), state("RUNNING")])
    stop = asyncio.Event()
    moves = 0

    async def churn() -> None:
        nonlocal moves
        states = ["PAUSED", "RUNNING"]
        while not stop.is_set():
            await publish(random.choice(bases), random.choice(wfs), [state(states[moves % 2])])
            moves += 1
            await later()

    task = asyncio.create_task(churn())
    try:
        for _ in range(3):
            ids: list[str] = []
            params = {"limit": "3", "definition_id": definition}
            while True:
                status, body = await listing(bases[0], **params)
                assert status == 200, body
                ids += [w["workflow_id"] for w in body["workflows"]]
                if body["next"] is None:
                    break
                params["cursor"] = body["next"]
                # Wait for a run or more to move before the next page.
                target = moves + 2
                while moves < target:
                    await asyncio.sleep(0.005)
            assert len(ids) == len(set(ids)), "a run was listed twice"
            assert set(ids) == set(wfs), f"skipped: {set(wfs) - set(ids)}"
    finally:
        stop.set()
        await task
    assert moves > 20


async def test_an_expired_run_is_no_longer_listed_and_leaves_the_index(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base = await serve(retention_seconds=1)
    definition = "def-" + uuid.uuid4().hex[:8]
    gone, kept = new_workflow(), new_workflow()
    await publish(base, gone, [plan(definition, "a"), state("RUNNING")])
    assert await walk(base, 10, definition_id=definition) == [gone]
    deadline = time.monotonic() + 10
    while await redis.exists(redis_keys.progress_key(gone)):
        assert time.monotonic() < deadline, "the workflow's keys did not expire"
        await asyncio.sleep(0.1)
    await publish(base, kept, [plan(definition, "a"), state("RUNNING")])
    assert await walk(base, 10, definition_id=definition) == [kept]
    index = runs.RunIndex(redis, retention_seconds=1)
    assert gone not in await index.records([gone, kept])


async def test_a_token_lists_only_what_it_may_read(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base = await serve(subscribe_secret=SECRET)
    definition = "def-" + uuid.uuid4().hex[:8]
    a, b = new_workflow(), new_workflow()
    for wf in (a, b):
        await publish(base, wf, [plan(definition, "x"), state("RUNNING")])
    status, body = await listing(base)
    assert status == 401 and body["status"] == 401
    token_a = auth.mint(SECRET, [a], 60)
    status, body = await listing(base, {"Authorization": f"Bearer {token_a}"})
    assert status == 200
    assert [w["workflow_id"] for w in body["workflows"]] == [a]
    status, body = await listing(base, {"Authorization": f"Bearer {token_a}"}, state="COMPLETED")
    assert body["workflows"] == []
    token_all = auth.mint(SECRET, ["*"], 60)
    status, body = await listing(
        base, {"Authorization": f"Bearer {token_all}"}, definition_id=definition
    )
    assert {w["workflow_id"] for w in body["workflows"]} == {a, b}


@pytest.mark.parametrize(
    ("query", "loc"),
    [
        ({"state": "RUNNING,BOGUS"}, "state"),
        ({"definition_id": "a:b"}, "definition_id"),
        ({"limit": "0"}, "limit"),
        ({"limit": "201"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": ""}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": runs.Cursor(1, 1, "x").encode()}, "cursor"),  # too old
    ],
)
async def test_bad_parameters_are_problems(serve: Serve, query: dict[str, str], loc: str) -> None:
    base = await serve()
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{base}/workflows", params=query) as resp,
    ):
        assert resp.status == 400
        assert resp.content_type == "application/problem+json"
        body = await resp.json()
    assert body["errors"][0]["loc"] == ["query", loc]


async def test_a_run_that_only_moves_on_in_time_rises_within_a_flush(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    """Node events in a new second move a run up without a state change (written with the
    next flush of queued moves, many runs to a script)."""
    base = await serve()
    definition = "def-" + uuid.uuid4().hex[:8]
    first, second = new_workflow(), new_workflow()
    await publish(base, first, [plan(definition, "a"), state("RUNNING")])
    await later()
    await publish(base, second, [plan(definition, "a"), state("RUNNING")])
    assert await walk(base, 10, definition_id=definition) == [second, first]
    this_second = int(time.time())
    while int(time.time()) == this_second:  # the index moves a run once a second at most
        await asyncio.sleep(0.01)
    await publish(base, first, [started("a")])
    deadline = time.monotonic() + 3
    while await walk(base, 10, definition_id=definition) != [first, second]:
        assert time.monotonic() < deadline, "the move was not written"
        await asyncio.sleep(0.05)


async def test_a_walk_whose_runs_all_moved_is_refused_not_left_to_hold_redis(
    redis: Any, new_workflow: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page looks up at most MOVED_MAX runs that moved since its walk began."""
    monkeypatch.setattr(runs, "MOVED_MAX", 2)
    index = runs.RunIndex(redis, retention_seconds=3600)
    wfs: list[str] = []
    while len(wfs) < 5:  # all in one shard (a Cluster has 16)
        wf = new_workflow()
        if runs.shard_of(wf, index.shards) == 0:
            wfs.append(wf)
    for i, wf in enumerate(wfs):
        await index.note(wf, f"{i + 1}-0", [_state_event("RUNNING")])
        await later()
    page = await index.page(limit=2)
    assert page.next is not None and len(page.workflow_ids) == 2
    await later()  # moves from here on score above the walk's time (Redis's clock)
    for i, wf in enumerate(wfs[:2]):  # two moved: still served
        await index.note(wf, f"{10 + i}-0", [_state_event("PAUSED")])
    assert len((await index.page(limit=2, cursor=page.next)).workflow_ids) == 2
    await index.note(wfs[2], "20-0", [_state_event("PAUSED")])  # a third: refused
    with pytest.raises(runs.BadCursor, match="start it again"):
        await index.page(limit=2, cursor=page.next)


def _event(event: dict[str, Any]) -> Any:
    from datetime import UTC, datetime

    from server.models import validate_event

    return validate_event(event, "x", max_event_bytes=65536, now=datetime.now(UTC))


def _state_event(to: str) -> Any:
    return _event({"event_type": "workflow_state_changed", "to_state": to})


async def test_a_walk_holds_when_a_writer_s_clock_is_behind(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    """Scores are Redis's time at the write, not the writer's: a write timed by a clock
    50 ms behind (as one taken before a round trip that lands after the walk's first page)
    must not put a run between the walk's cursor and its start, where no page lists it."""
    index = runs.RunIndex(redis, retention_seconds=3600)
    behind = runs.RunIndex(redis, retention_seconds=3600, clock=lambda: time.time() - 0.05)
    old, new = new_workflow(), new_workflow()
    definition = "def-" + uuid.uuid4().hex[:8]  # other runs in a shared Redis stay out
    planned = _event(plan(definition, "a"))
    await index.note(old, "1-0", [planned, _state_event("RUNNING")])
    await later()
    await index.note(new, "2-0", [planned, _state_event("RUNNING")])
    start = time.time()
    while time.time() - start < 0.1:  # the cursor will stand 100 ms before the walk's time
        await asyncio.sleep(0.01)
    page = await index.page(limit=1, definition_id=definition)
    assert page.workflow_ids == [new] and page.next is not None
    await behind.note(old, "3-0", [_state_event("PAUSED")])
    rest = await index.page(limit=1, definition_id=definition, cursor=page.next)
    assert rest.workflow_ids == [old], "the moved run was skipped"


async def test_sweep_forgets_runs_whose_keys_are_gone(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    index = runs.RunIndex(redis, retention_seconds=3600)
    gone, kept = new_workflow(), new_workflow()
    for i, wf in enumerate((gone, kept)):
        await index.note(wf, f"{i + 1}-0", [_state_event("RUNNING")])
    await redis.set(redis_keys.progress_key(kept), b"x")  # stands for a live run's keys
    assert await index.sweep() >= 1
    assert set(await index.records([gone, kept])) == {kept}


@pytest.mark.parametrize(
    "query", ["limit=5&limit=6", "definition_id=a&definition_id=b", "cursor=a&cursor=b"]
)
async def test_a_list_parameter_given_twice_is_a_400_problem(serve: Serve, query: str) -> None:
    base = await serve()
    async with aiohttp.ClientSession() as s, s.get(f"{base}/workflows?{query}") as resp:
        body = await resp.json()
        assert (resp.status, body["type"]) == (400, "/problems/repeated-parameter"), body
        assert body["errors"][0]["loc"] == ["query", query.split("=")[0]]
