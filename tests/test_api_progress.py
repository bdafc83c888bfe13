"""GET /workflows/{id}/progress over a real socket: JSON, ETag, the stream form, live ETA."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from server import app_keys, redis_keys, wire
from testing.events import iso, state
from testing.sse import iter_messages
from tests.conftest import Serve

pytestmark = pytest.mark.backends("fakeredis", "redis", "cluster")

SPEC_KEYS = wire.keys(wire.Progress)  # checked against the SPEC's list in test_metrics_openapi


async def get_progress(
    s: aiohttp.ClientSession, base: str, wf: str, headers: dict[str, str] | None = None
) -> tuple[int, Any, Any]:
    async with s.get(f"{base}/workflows/{wf}/progress", headers=headers) as resp:
        body = await resp.json(content_type=None) if resp.status != 304 else None
        return resp.status, resp.headers.copy(), body


async def test_unknown_workflow_is_404(serve: Serve, new_workflow: Callable[[], str]) -> None:
    base, wf = await serve(), new_workflow()
    async with aiohttp.ClientSession() as s:
        status, headers, body = await get_progress(s, base, wf)
        assert status == 404 and headers["Content-Type"].startswith("application/problem+json")
        assert body["status"] == 404
        status, _, _ = await get_progress(s, base, wf, {"Accept": "text/event-stream"})
        assert status == 404


async def test_polling_never_keeps_a_workflow_past_its_retention(
    serve: Serve, new_workflow: Callable[[], str], redis: Any
) -> None:
    base, wf = await serve(retention_seconds=1), new_workflow()
    await serve.apps[0][app_keys.publisher_key].publish(wf, state("RUNNING"))
    async with aiohttp.ClientSession() as s:
        # Each poll stores what it showed; that must not extend the workflow's life.
        deadline = time.monotonic() + 6
        while (status := (await get_progress(s, base, wf))[0]) == 200:
            assert time.monotonic() < deadline, "polling kept the workflow past its retention"
            await asyncio.sleep(0.05)
    assert status == 404
    assert await redis.exists(*redis_keys.workflow_keys(wf)) == 0


async def test_every_key_present_and_etag_answers_304(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    publisher = serve.apps[0][app_keys.publisher_key]
    first = await publisher.publish(
        wf, {"event_type": "node_started", "node_id": "a", "node_name": "이상 탐지"}
    )
    async with aiohttp.ClientSession() as s:
        status, headers, body = await get_progress(s, base, wf)
        assert status == 200 and set(body) == SPEC_KEYS
        assert body["total_known"] is False and body["total_nodes"] == 1
        assert body["running"][0]["node_name"] == "이상 탐지" and body["current_node"] == "a"
        assert body["estimated_remaining_seconds"] is None  # no basis yet
        assert body["last_event_id"] == first and headers["ETag"] == f'"{first}"'
        status, _, _ = await get_progress(s, base, wf, {"If-None-Match": headers["ETag"]})
        assert status == 304
        await publisher.publish(wf, {"event_type": "node_completed", "node_id": "a"})
        status, headers2, body2 = await get_progress(
            s, base, wf, {"If-None-Match": headers["ETag"]}
        )
        assert (
            status == 200 and body2["completed_nodes"] == 1 and headers2["ETag"] != headers["ETag"]
        )


async def test_progress_is_exact_after_the_stream_was_trimmed(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(history_maxlen=5), new_workflow()
    publisher = serve.apps[0][app_keys.publisher_key]
    nodes = [f"n{i}" for i in range(20)]
    await publisher.publish(
        wf, {"event_type": "workflow_planned", "nodes": [{"node_id": n} for n in nodes]}
    )
    await publisher.publish(wf, state("RUNNING"))
    for n in nodes[:15]:
        await publisher.publish_many(
            wf,
            [
                {"event_type": "node_started", "node_id": n},
                {"event_type": "node_completed", "node_id": n},
            ],
        )
    await publisher.publish(wf, {"event_type": "node_skipped", "node_id": "n15"})
    async with aiohttp.ClientSession() as s:
        _, _, body = await get_progress(s, base, wf)
    assert (body["total_nodes"], body["completed_nodes"], body["skipped_nodes"]) == (20, 15, 1)
    assert body["percentage"] == 80.0 and body["total_known"] is True


async def test_progress_stream_sends_changes_and_ends_after_terminal(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    publisher = serve.apps[0][app_keys.publisher_key]
    await publisher.publish(
        wf, {"event_type": "workflow_planned", "nodes": [{"node_id": "a"}, {"node_id": "b"}]}
    )
    url = f"{base}/workflows/{wf}/progress"
    frames: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers={"Accept": "text/event-stream"}) as resp:
            assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"

            async def read() -> None:
                async for msg in iter_messages(resp):
                    if msg.event == "progress":
                        frames.append(msg.json())
                        assert msg.id == frames[-1]["last_event_id"]
                        if len(frames) == 1:  # the current object on connect, then changes
                            await publisher.publish(wf, state("RUNNING"))
                            await publisher.publish(
                                wf, {"event_type": "node_completed", "node_id": "a"}
                            )
                            await publisher.publish(
                                wf, {"event_type": "node_completed", "node_id": "b"}
                            )
                            await publisher.publish(wf, state("COMPLETED"))

            await asyncio.wait_for(read(), 10)  # returns when the server ends the stream
        assert frames[0]["percentage"] == 0.0 and frames[-1]["percentage"] == 100.0
        assert frames[-1]["state"] == "COMPLETED" and frames[-1]["estimated_remaining_seconds"] == 0
        assert len(frames) <= 5  # changes only, coalesced under the 4-per-second limit
        async with s.get(
            url,
            headers={"Accept": "text/event-stream", "Last-Event-ID": frames[-1]["last_event_id"]},
        ) as resp:
            assert resp.status == 204


async def test_progress_stream_rejects_a_malformed_last_event_id_and_ignores_an_empty_one(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    first = await serve.apps[0][app_keys.publisher_key].publish(wf, state("RUNNING"))
    url = f"{base}/workflows/{wf}/progress"
    sse = {"Accept": "text/event-stream"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        for headers, query in [
            ({"Last-Event-ID": "not-an-id"}, ""),
            ({"Last-Event-ID": "12"}, ""),
            ({}, "?lastEventId=1-x"),
            ({"Last-Event-ID": first}, "?lastEventId=bad"),  # both are checked, as for events
        ]:
            async with s.get(url + query, headers={**sse, **headers}) as resp:
                assert resp.status == 400, (headers, query)
                assert resp.headers["Content-Type"].startswith("application/problem+json")
                assert (await resp.json(content_type=None))["status"] == 400
        for headers, query in [({"Last-Event-ID": ""}, ""), ({}, "?lastEventId=")]:
            async with s.get(url + query, headers={**sse, **headers}) as resp:
                assert resp.status == 200, (headers, query)
                assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
                msg = await anext(m async for m in iter_messages(resp) if m.event == "progress")
                assert msg.json()["last_event_id"] == first


async def run_chain(
    base: str,
    wf: str,
    definition: str,
    node_type: str,
    durations: list[float],
    at_half: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
) -> list[dict[str, Any]]:
    """Run a sequential plan in real time over HTTP; return the progress seen after each step."""
    seen: list[dict[str, Any]] = []
    nodes = [f"step-{i}" for i in range(len(durations))]
    plan = {
        "event_type": "workflow_planned",
        "definition_id": definition,
        "max_concurrency": 1,
        "nodes": [
            {
                "node_id": n,
                "node_type": node_type,
                "node_name": f"단계 {i}",
                "depends_on": [nodes[i - 1]] if i else [],
            }
            for i, n in enumerate(nodes)
        ],
    }
    async with aiohttp.ClientSession() as s:

        async def post(event: dict[str, Any]) -> None:
            async with s.post(f"{base}/workflows/{wf}/events", json=event) as resp:
                assert resp.status == 201

        async def snap() -> dict[str, Any]:
            status, _, body = await get_progress(s, base, wf)
            assert status == 200 and isinstance(body, dict)
            seen.append(body)
            return body

        await post(plan)
        await post(state("RUNNING"))
        for i, (node, d) in enumerate(zip(nodes, durations, strict=True)):
            await post({"event_type": "node_started", "node_id": node})
            body = await snap()
            assert body["running_nodes"] == 1 and body["current_node"] == node
            if i == len(nodes) // 2 and at_half is not None:
                await at_half(body)
            await asyncio.sleep(d)  # the simulated node's work, not synchronisation
            await post({"event_type": "node_completed", "node_id": node})
            body = await snap()
            assert body["completed_nodes"] == i + 1
            assert body["percentage"] == round(100 * (i + 1) / len(nodes), 1)
        await post(state("COMPLETED"))
        await snap()
    return seen


async def test_live_run_numbers_and_second_run_eta_within_25_percent_at_half_way(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base = await serve()
    definition, node_type = f"live-{uuid.uuid4().hex[:8]}", f"type-{uuid.uuid4().hex[:8]}"
    durations = [0.25, 0.5, 0.3, 0.4, 0.35, 0.3]
    first = await run_chain(base, new_workflow(), definition, node_type, durations)
    assert first[0]["estimated_remaining_seconds"] is None  # nothing to go on yet
    assert all(b["total_known"] and b["total_nodes"] == 6 for b in first)
    final = first[-1]
    assert final["state"] == "COMPLETED" and final["percentage"] == 100.0
    assert final["estimated_remaining_seconds"] == 0 and final["time_percentage"] == 100.0
    assert final["elapsed_seconds"] == pytest.approx(sum(durations), abs=0.5)
    percentages = [b["percentage"] for b in first]
    assert percentages == sorted(percentages)  # never backwards

    estimate: dict[str, float] = {}

    async def at_half(body: dict[str, Any]) -> None:
        estimate["eta"] = body["estimated_remaining_seconds"]
        estimate["at"] = time.monotonic()

    wf2 = new_workflow()
    second = await run_chain(base, wf2, definition, node_type, durations, at_half)
    truth = time.monotonic() - estimate["at"]  # from the half-way poll to completion
    assert estimate["eta"] is not None
    assert abs(estimate["eta"] - truth) <= 0.25 * truth, (estimate, truth)
    assert all(b["estimated_remaining_seconds"] > 0 for b in second[:-1])


async def test_eta_after_a_burst_of_events_follows_the_history_at_once(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    """Five nodes' events spanning 30 s, published in one request: the next poll shows what
    the history says is left (80 s), not the 110 s of the poll before, held back by the
    smoothing because only a moment of wall-clock time passed between the two polls."""
    base, definition = await serve(), "burst-" + uuid.uuid4().hex[:8]
    node_type = definition + "-type"
    durations = [2 * (i + 1) for i in range(10)]  # 2, 4, ... 20 s; 110 s in a chain
    plan_nodes = [
        {"node_id": f"n{i}", "node_type": node_type, "depends_on": [f"n{i - 1}"] if i else []}
        for i in range(10)
    ]

    def run(start: float, nodes: range) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        at = start
        for i in nodes:
            events.append({"event_type": "node_started", "node_id": f"n{i}", "timestamp": iso(at)})
            at += durations[i]
            events.append(
                {
                    "event_type": "node_completed",
                    "node_id": f"n{i}",
                    "duration_ms": durations[i] * 1000,
                    "timestamp": iso(at),
                }
            )
        return events

    now = time.time()
    planned = {"event_type": "workflow_planned", "definition_id": definition, "nodes": plan_nodes}
    async with aiohttp.ClientSession() as s:
        first, second = new_workflow(), new_workflow()
        earlier = now - 3600
        done = {**state("COMPLETED"), "timestamp": iso(earlier + 111)}
        body = [{**planned, "timestamp": iso(earlier)}, *run(earlier, range(10)), done]
        async with s.post(f"{base}/workflows/{first}/events", json=body) as resp:
            assert resp.status == 201  # its durations are now the definition's history

        async with s.post(
            f"{base}/workflows/{second}/events", json={**planned, "timestamp": iso(now - 30)}
        ) as resp:
            assert resp.status == 201
        _, _, before = await get_progress(s, base, second)
        assert before["estimated_remaining_seconds"] > 90  # all 110 s of work are ahead
        async with s.post(f"{base}/workflows/{second}/events", json=run(now - 30, range(5))) as r:
            assert r.status == 201
        _, _, after = await get_progress(s, base, second)
    assert after["completed_nodes"] == 5
    assert abs(after["estimated_remaining_seconds"] - 80) <= 0.25 * 80, after
