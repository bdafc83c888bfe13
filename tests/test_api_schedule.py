"""GET /workflows/{id}/schedule over a real socket: real times, predicted times, the ETA edge."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import aiohttp
import pytest

from server import app_keys, wire
from testing.events import DIAMOND, dag_plan, iso, state, timed
from tests.conftest import Serve

pytestmark = pytest.mark.backends("fakeredis", "redis", "cluster")

NODE_KEYS = wire.keys(wire.ScheduledNode)


def at(iso: str | None) -> float:
    assert iso is not None
    return datetime.fromisoformat(iso).timestamp()


async def get(s: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with s.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


# A diamond then a tail: a -> (b, c) -> d -> e. The history says b takes 4 s, c 8 s.
SECONDS = {"a": 2, "b": 4, "c": 8, "d": 3, "e": 1}
DEPS = DIAMOND


def plan(definition: str, ts: float) -> dict[str, Any]:
    return dag_plan(definition, ts, lambda n: f"<b>{n}</b> 노드", DEPS)


node = timed


def whole_run(start: float) -> list[dict[str, Any]]:
    """A finished earlier run of the definition, so that the ETA has a history."""
    events = [node("node_started", "a", start), node("node_completed", "a", start + 2)]
    for n in ("b", "c"):
        events += [
            node("node_started", n, start + 2),
            node("node_completed", n, start + 2 + SECONDS[n]),
        ]
    events += [
        node("node_started", "d", start + 10),
        node("node_completed", "d", start + 13),
        node("node_started", "e", start + 13),
        node("node_completed", "e", start + 14),
    ]
    return [*events, {**state("COMPLETED"), "timestamp": iso(start + 14)}]


async def test_unknown_workflow_is_404_and_a_bad_id_400(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base = await serve()
    async with aiohttp.ClientSession() as s:
        status, body = await get(s, f"{base}/workflows/{new_workflow()}/schedule")
        assert status == 404 and body["status"] == 404
        status, body = await get(s, f"{base}/workflows/a%7Bb/schedule")
        assert status == 400


async def test_schedule_has_real_and_predicted_times_and_ends_at_the_shown_eta(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base = await serve()
    definition = "sched-" + uuid.uuid4().hex[:8]
    now = time.time()
    async with aiohttp.ClientSession() as s:
        earlier = new_workflow()
        body = [plan(definition, now - 3600), *whole_run(now - 3600)]
        async with s.post(f"{base}/workflows/{earlier}/events", json=body) as resp:
            assert resp.status == 201

        # This run: a finished 1 s ago, b has run 1 s, c has not started (with no
        # max_concurrency it is predicted to start now), d and e wait.
        wf = new_workflow()
        start = now - 3
        body = [
            plan(definition, start),
            {**state("RUNNING"), "timestamp": iso(start)},
            node("node_started", "a", start),
            node("node_completed", "a", start + 2),
            node("node_started", "b", start + 2),
        ]
        async with s.post(f"{base}/workflows/{wf}/events", json=body) as resp:
            assert resp.status == 201

        status, progress = await get(s, f"{base}/workflows/{wf}/progress")
        assert status == 200
        tracker = serve.apps[0][app_keys.tracker_key]
        cached = tracker._cache[wf]
        status, sched = await get(s, f"{base}/workflows/{wf}/schedule")
        assert status == 200
        # The same estimate answered both: the schedule was read from its futures.
        assert tracker._cache[wf] is cached and cached.forecast._schedule is not None

        wire.adapter(wire.Schedule).validate_python(sched)  # as /openapi.json documents it
        assert sched["workflow_id"] == wf and sched["state"] == "RUNNING"
        assert sched["last_event_id"] == progress["last_event_id"]
        nodes = {n["node_id"]: n for n in sched["nodes"]}
        assert [n["node_id"] for n in sched["nodes"]] == list(DEPS)  # plan order, once each
        assert all(set(n) == NODE_KEYS for n in sched["nodes"])
        assert nodes["a"]["node_name"] == "<b>a</b> 노드" and nodes["d"]["depends_on"] == ["b", "c"]

        a, b, c, d, e = (nodes[n] for n in "abcde")
        assert a["status"] == "completed" and a["expected_end_at"] is None
        assert at(a["finished_at"]) - at(a["started_at"]) == pytest.approx(2, abs=0.01)
        assert b["status"] == "running" and b["expected_start_at"] is None
        assert at(b["started_at"]) == pytest.approx(start + 2, abs=0.01)
        as_of = at(sched["as_of"])
        # b has run ~1 s of its usual 4 s: it is predicted to end in about 3 s.
        assert 1.5 < at(b["expected_end_at"]) - as_of < 6
        assert c["status"] == "pending" and c["started_at"] is None
        assert at(c["expected_start_at"]) == pytest.approx(as_of, abs=0.01)  # ready now
        assert 5 < at(c["expected_end_at"]) - as_of < 12
        # Dependencies first, in the predicted times too (medians of the same futures).
        assert (
            at(d["expected_start_at"])
            >= max(at(b["expected_end_at"]), at(c["expected_end_at"])) - 0.05
        )
        assert at(e["expected_start_at"]) >= at(d["expected_end_at"]) - 0.05
        # The right edge is the ETA answered with it, to the millisecond...
        edge = max(at(n["expected_end_at"]) for n in sched["nodes"] if n["expected_end_at"])
        assert edge == at(sched["estimated_completion_at"])
        assert at(e["expected_end_at"]) == edge
        remaining = sched["estimated_remaining_seconds"]
        assert edge - as_of == pytest.approx(remaining, abs=0.002)
        # ...and the one /progress showed a moment before, within a second.
        assert abs(at(progress["estimated_completion_at"]) - edge) < 1.0
        assert 8 < remaining < 20

        body = [
            node("node_completed", "b", start + 6),
            node("node_started", "c", start + 6),
            node("node_failed", "c", start + 7, error="<img src=x>"),
            node("node_started", "c", start + 7),
            node("node_completed", "c", start + 8),
            node("node_skipped", "d", start + 8),
            node("node_skipped", "e", start + 8),
            {**state("COMPLETED"), "timestamp": iso(start + 8)},
        ]
        async with s.post(f"{base}/workflows/{wf}/events", json=body) as resp:
            assert resp.status == 201
        status, sched = await get(s, f"{base}/workflows/{wf}/schedule")
        assert status == 200 and sched["state"] == "COMPLETED"
        wire.adapter(wire.Schedule).validate_python(sched)
        assert sched["estimated_remaining_seconds"] == 0
        assert all(
            n["expected_start_at"] is None and n["expected_end_at"] is None for n in sched["nodes"]
        )
        nodes = {n["node_id"]: n for n in sched["nodes"]}
        assert nodes["c"]["attempts"] == 2 and nodes["c"]["status"] == "completed"
        assert at(nodes["c"]["started_at"]) == pytest.approx(start + 7, abs=0.01)
        assert nodes["d"]["status"] == "skipped" and nodes["d"]["started_at"] is None


async def test_schedule_needs_the_subscriber_token(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(subscribe_secret="s" * 32), new_workflow()
    await serve.apps[0][app_keys.publisher_key].publish(wf, state("RUNNING"))
    async with aiohttp.ClientSession() as s:
        status, body = await get(s, f"{base}/workflows/{wf}/schedule")
        assert status == 401 and body["status"] == 401


async def test_schedule_without_a_basis_has_no_predicted_times(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    publisher = serve.apps[0][app_keys.publisher_key]
    await publisher.publish(wf, {"event_type": "node_started", "node_id": "x"})
    async with aiohttp.ClientSession() as s:
        status, sched = await get(s, f"{base}/workflows/{wf}/schedule")
    assert status == 200 and sched["estimated_completion_at"] is None
    [x] = sched["nodes"]
    assert x["status"] == "running" and x["expected_end_at"] is None and x["started_at"]
