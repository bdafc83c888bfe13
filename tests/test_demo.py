"""The demo engine: a complete, valid run of the 30-node definition, checked over HTTP and SSE."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from server import demo, redis_keys
from server.app import create_app
from server.models import WorkflowPlanned
from server.settings import Settings
from testing.procs import ServerProcess
from testing.sse import Message, collect
from tests.conftest import HISTORY_PREFIX

FAST = 0.02  # a whole run in about a second

Start = Callable[..., Awaitable[tuple[str, web.Application]]]


@pytest.fixture
async def demo_server(redis: Any) -> AsyncIterator[Start]:
    """The real app with the demo engine on a real socket; its base URL and the app."""
    servers: list[TestServer] = []
    apps: list[web.Application] = []

    async def start(
        *, time_scale: float = FAST, with_demo: bool = True
    ) -> tuple[str, web.Application]:
        app = create_app(
            Settings(retention_seconds=600, history_prefix=HISTORY_PREFIX), redis=redis
        )
        if with_demo:
            demo.setup_demo(app, time_scale=time_scale)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        apps.append(app)
        return str(server.make_url("")).rstrip("/"), app

    yield start
    runs: list[str] = []
    for app in apps:
        if demo.runner_key in app:
            runs.extend(app[demo.runner_key].recent)
    for server in servers:
        await server.close()
    for wf in runs:
        await redis.delete(*redis_keys.workflow_keys(wf))


def check_run(msgs: list[Message]) -> dict[str, str]:
    """Assert one run is complete and consistent; returns each node's final status."""
    events = [m.json() for m in msgs]
    keys = [tuple(map(int, m.id.split("-"))) for m in msgs if m.id]
    assert len(keys) == len(msgs) and keys == sorted(set(keys))  # ids strictly increasing
    plan = WorkflowPlanned.model_validate(events[0])
    assert len(plan.nodes) == 30 and plan.definition_id == demo.DEFINITION_ID
    assert plan.max_concurrency == demo.MAX_CONCURRENCY
    assert sum(bool(n.depends_on and len(n.depends_on) > 1) for n in plan.nodes) >= 3  # joins
    assert any(re.search("[가-힣]", n.node_name or "") for n in plan.nodes)
    states = [e["to_state"] for e in events if e["event_type"] == "workflow_state_changed"]
    assert states == ["RUNNING", "COMPLETED"]
    assert events[-1]["event_type"] == "workflow_state_changed"  # nothing after the end

    final: dict[str, str] = {}
    running: set[str] = set()
    max_running = 0
    for e in events[2:-1]:
        node = e["node_id"]
        kind = e["event_type"]
        if kind == "node_started":
            assert final.get(node) in (None, "failed"), (node, final.get(node))
            deps = next(n.depends_on or [] for n in plan.nodes if n.node_id == node)
            assert all(final.get(d) in ("completed", "skipped") for d in deps), node
            running.add(node)
            max_running = max(max_running, len(running))
            final[node] = "running"
        elif kind == "node_progress":
            assert node in running and 0 < e["fraction"] < 1
        elif kind == "node_completed":
            assert node in running and isinstance(e["duration_ms"], int)
            running.discard(node)
            final[node] = "completed"
        elif kind == "node_failed":
            assert node in running and e["error"]
            running.discard(node)
            final[node] = "failed"
        elif kind == "node_skipped":
            assert node not in final
            final[node] = "skipped"
        else:
            raise AssertionError(f"unexpected {kind} in the middle of a run")
    assert not running and max_running <= demo.MAX_CONCURRENCY
    assert set(final) == {n.node_id for n in plan.nodes}
    assert set(final.values()) <= {"completed", "skipped"}  # every failure was retried
    return final


async def test_demo_run_started_over_http_is_complete_and_valid(demo_server: Start) -> None:
    base, app = await demo_server()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/demo/workflows") as resp:
            assert resp.status == 200  # the page shows its button on this
            info = await resp.json()
            assert info["enabled"] is True and info["definition_id"] == demo.DEFINITION_ID
        async with session.post(f"{base}/demo/workflows") as resp:
            assert resp.status == 201
            wf = (await resp.json())["workflow_id"]
        t0 = time.monotonic()
        msgs = await collect(session, f"{base}/workflows/{wf}/events", timeout=30)
        took = time.monotonic() - t0
        final = check_run(msgs)
        assert took < 15
        if any(r.canonical.endswith("/progress") for r in app.router.resources()):
            async with session.get(f"{base}/workflows/{wf}/progress") as resp:
                assert resp.status == 200
                progress = await resp.json()
            assert progress["state"] == "COMPLETED" and progress["percentage"] == 100
            assert progress["total_nodes"] == 30 == len(final)
            assert progress["completed_nodes"] + progress["skipped_nodes"] == 30


async def test_background_runner_runs_the_definition_again_and_again(demo_server: Start) -> None:
    base, app = await demo_server(time_scale=0.01)
    runner = app[demo.runner_key]
    deadline = time.monotonic() + 30
    while len(runner.recent) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(runner.recent) >= 2, "the background loop did not start a second run"
    first = runner.recent[-1]  # finished before the second one started
    async with aiohttp.ClientSession() as session:
        check_run(await collect(session, f"{base}/workflows/{first}/events", timeout=30))


async def test_demo_routes_exist_only_with_the_demo(demo_server: Start) -> None:
    base, _ = await demo_server(with_demo=False)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/demo/workflows") as resp:
            assert resp.status == 404
        async with session.post(f"{base}/demo/workflows") as resp:
            assert resp.status in (404, 405)


def test_runs_vary_with_retried_failures_and_skipped_branches_now_and_then() -> None:
    scripts = [demo.make_script(random.Random(seed)) for seed in range(200)]
    with_failure = sum(bool(s.failures) for s in scripts)
    with_skip = sum(bool(s.skipped) for s in scripts)
    assert 30 < with_failure < 190 and 30 < with_skip < 190
    assert all(s.skipped in (frozenset(), frozenset(demo.SKIPPABLE_BRANCH)) for s in scripts)
    # Lognormal around each node's median: the typical draw is near it.
    for node in demo.NODES:
        draws = sorted(s.durations[node.node_id] for s in scripts)
        assert 0.75 * node.median_s < draws[len(draws) // 2] < 1.33 * node.median_s


def test_an_unscaled_run_takes_half_a_minute_to_a_minute_and_a_half() -> None:
    """The critical path at time scale 1, computed from the drawn durations (no waiting)."""
    totals = []
    for seed in range(50):
        script = demo.make_script(random.Random(seed))
        finish: dict[str, float] = {}
        for node in demo.NODES:  # topological order; ignores the concurrency cap: a lower bound
            start = max((finish[d] for d in node.depends_on), default=0.0)
            finish[node.node_id] = start + script.durations[node.node_id]
        totals.append(max(finish.values()))
    totals.sort()
    assert 25 <= totals[len(totals) // 2] <= 90


def test_plan_event_is_a_valid_30_node_dag() -> None:
    plan = WorkflowPlanned.model_validate(demo.plan_event())
    assert len(plan.nodes) == 30
    names = {n.node_name for n in plan.nodes}
    assert {"품질 판정", "데이터 조회", "이상 탐지"} <= names
    assert demo.new_workflow_id().startswith(f"demo-{datetime.now(UTC):%Y%m%d}")


async def test_python_m_server_demo_starts_the_engine_and_prints_the_dashboard_url() -> None:
    srv = ServerProcess("--demo", clean=True)
    try:
        await srv.start()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{srv.url}/demo/workflows") as resp:
                assert resp.status == 200
                assert (await resp.json())["current"].startswith("demo-")
            async with session.get(f"{srv.url}/") as resp:
                assert resp.status == 200 and "/static/app.js" in await resp.text()
        assert f"open {srv.url}/ to watch" in srv.output()
    finally:
        srv.stop()
