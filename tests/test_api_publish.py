"""Publishing over HTTP: ids, batches, idempotency, and every 4xx of the SPEC with its body."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from server import redis_keys
from tests.conftest import Serve

pytestmark = pytest.mark.backends("fakeredis", "redis", "cluster")

STARTED = {"event_type": "node_started", "node_id": "n1", "node_name": "품질 판정"}


async def post(
    url: str, body: Any, *, raw: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession() as s, s.post(url, data=data, headers=hdrs) as resp:
        text = await resp.text()
        return resp.status, dict(resp.headers), json.loads(text) if text else None


def assert_problem(status: int, headers: dict[str, str], body: Any, expected: int) -> None:
    assert status == expected, body
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["status"] == expected
    assert {"type", "title", "detail"} <= body.keys()


async def stored(redis: Any, wf: str) -> list[dict[str, Any]]:
    rows = await redis.xrange(redis_keys.stream_key(wf))
    return [json.loads(fields[b"d"]) for _, fields in rows]


async def test_publish_returns_ids_in_input_order_and_stores_normalised_events(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    status, _, body = await post(f"{base}/workflows/{wf}/events", STARTED)
    assert status == 201 and len(body["ids"]) == 1
    batch = [
        {
            "event_type": "node_completed",
            "node_id": "n1",
            "duration_ms": 5,
            "timestamp": "2026-01-22T19:30:45+09:00",
        },
        {"event_type": "node_skipped", "node_id": "n2", "workflow_id": wf},
    ]
    status, _, body2 = await post(f"{base}/workflows/{wf}/events", batch)
    assert status == 201 and len(body2["ids"]) == 2
    ids = [eid.decode() for eid, _ in await redis.xrange(redis_keys.stream_key(wf))]
    assert ids == body["ids"] + body2["ids"]
    events = await stored(redis, wf)
    assert events[1]["timestamp"] == "2026-01-22T10:30:45Z"  # converted to UTC with Z
    assert all(e["workflow_id"] == wf for e in events)
    assert events[0]["timestamp"].endswith("Z")  # filled by the server on receipt
    assert events[0]["node_name"] == "품질 판정"


async def test_rejected_batch_stores_nothing(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    batch = [STARTED, {"event_type": "node_completed", "node_id": "n1", "duration_ms": -1}, STARTED]
    status, headers, body = await post(f"{base}/workflows/{wf}/events", batch)
    assert_problem(status, headers, body, 422)
    assert body["errors"][0]["loc"][0] == 1
    assert await redis.exists(*redis_keys.workflow_keys(wf)) == 0


async def test_idempotent_retry_stores_one_event(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    event = {**STARTED, "idempotency_key": "start-n1-attempt-1"}
    first = await post(f"{base}/workflows/{wf}/events", event)
    again = await post(f"{base}/workflows/{wf}/events", event)
    assert first[0] == again[0] == 201
    assert first[2] == again[2]
    # In a batch too: the known key answers its first id, the new event is stored.
    status, _, body = await post(
        f"{base}/workflows/{wf}/events", [event, {**STARTED, "node_id": "n2"}]
    )
    assert status == 201 and body["ids"][0] == first[2]["ids"][0]
    assert len(await stored(redis, wf)) == 2
    # The longest key the SPEC allows (128 characters; 129 is a 422 below) works the same.
    longest = {**STARTED, "node_id": "n3", "idempotency_key": "k" * 128}
    first = await post(f"{base}/workflows/{wf}/events", longest)
    again = await post(f"{base}/workflows/{wf}/events", longest)
    assert first[0] == again[0] == 201 and first[2] == again[2]
    assert len(await stored(redis, wf)) == 3


@pytest.mark.parametrize(
    "bad_id", ["a:b", "a*", "a{b}", "a%20b", "-lead", "x" * 129, "%ED%92%88", "a%0Ab"]
)
async def test_bad_workflow_id_is_400_before_redis(serve: Serve, redis: Any, bad_id: str) -> None:
    base = await serve()
    async with aiohttp.ClientSession() as s:
        for method in ("POST", "GET"):
            async with s.request(
                method,
                f"{base}/workflows/{bad_id}/events",
                data=json.dumps(STARTED),
                headers={"Content-Type": "application/json"},
            ) as resp:
                body = await resp.json(content_type=None)
                assert_problem(resp.status, dict(resp.headers), body, 400)
        async with s.get(f"{base}/workflows/{bad_id}/events") as resp:
            assert resp.status == 400


@pytest.mark.parametrize(
    ("body", "raw", "ctype", "expected"),
    [
        (None, b"{not json", "application/json", 400),
        (None, b"\xff\xfe", "application/json", 400),
        (
            None,
            b'{"event_type": "node_progress", "node_id": "a", "fraction": NaN}',
            "application/json",
            400,
        ),
        (STARTED, None, "text/plain", 415),
        ([], None, "application/json", 422),
        (3, None, "application/json", 422),
        ("node_started", None, "application/json", 422),
        ({"event_type": "nope"}, None, "application/json", 422),
        ({**STARTED, "colour": "red"}, None, "application/json", 422),
        ({**STARTED, "workflow_id": "someone-else"}, None, "application/json", 422),
        ({**STARTED, "timestamp": "yesterday"}, None, "application/json", 422),
        ({**STARTED, "timestamp": "2026-01-22T10:00:00"}, None, "application/json", 422),
        (
            {"event_type": "node_progress", "node_id": "a", "fraction": 1.5},
            None,
            "application/json",
            422,
        ),
        (
            {"event_type": "workflow_state_changed", "to_state": "DONE"},
            None,
            "application/json",
            422,
        ),
        ({"event_type": "workflow_planned", "nodes": []}, None, "application/json", 422),
        (
            {"event_type": "workflow_planned", "nodes": [{"node_id": "a"}, {"node_id": "a"}]},
            None,
            "application/json",
            422,
        ),
        (
            {"event_type": "workflow_planned", "nodes": [{"node_id": "a", "depends_on": ["b"]}]},
            None,
            "application/json",
            422,
        ),
        (
            {
                "event_type": "workflow_planned",
                "nodes": [
                    {"node_id": "a", "depends_on": ["b"]},
                    {"node_id": "b", "depends_on": ["a"]},
                ],
            },
            None,
            "application/json",
            422,
        ),
        ([STARTED] * 1001, None, "application/json", 422),
        ({**STARTED, "idempotency_key": "k" * 129}, None, "application/json", 422),
    ],
)
async def test_invalid_publish_is_a_problem_and_stores_nothing(
    serve: Serve,
    redis: Any,
    new_workflow: Callable[[], str],
    body: Any,
    raw: bytes | None,
    ctype: str,
    expected: int,
) -> None:
    base, wf = await serve(), new_workflow()
    status, headers, answer = await post(
        f"{base}/workflows/{wf}/events", body, raw=raw, headers={"Content-Type": ctype}
    )
    assert_problem(status, headers, answer, expected)
    if expected == 422 and body not in ([], 3, "node_started"):
        assert answer["errors"] and {"loc", "msg"} <= answer["errors"][0].keys()
    assert await redis.exists(*redis_keys.workflow_keys(wf)) == 0


async def test_event_over_max_event_bytes_is_422_but_a_big_plan_is_fine(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(max_event_bytes=1024), new_workflow()
    big = {"event_type": "node_failed", "node_id": "a", "error": "x" * 2000}
    status, headers, body = await post(f"{base}/workflows/{wf}/events", big)
    assert_problem(status, headers, body, 422)
    status, headers, body = await post(f"{base}/workflows/{wf}/events", [STARTED, big])
    assert_problem(status, headers, body, 422)
    plan = {
        "event_type": "workflow_planned",
        "nodes": [{"node_id": f"node-{i}", "node_name": "데이터 조회"} for i in range(10_000)],
    }
    status, _, body = await post(f"{base}/workflows/{wf}/events", plan)
    assert status == 201, body
    assert len(await stored(redis, wf)) == 1


async def test_body_over_max_body_bytes_is_413_also_when_chunked(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(max_body_bytes=10_000), new_workflow()
    batch = [{**STARTED, "node_id": f"n{i}"} for i in range(400)]
    status, headers, body = await post(f"{base}/workflows/{wf}/events", batch)
    assert_problem(status, headers, body, 413)

    async def chunks() -> Any:
        payload = json.dumps(batch).encode()
        for i in range(0, len(payload), 1000):
            yield payload[i : i + 1000]

    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{base}/workflows/{wf}/events",
            data=chunks(),
            headers={"Content-Type": "application/json"},
        ) as resp,
    ):
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
        assert_problem(resp.status, dict(resp.headers), await resp.json(content_type=None), 413)
    assert await redis.exists(*redis_keys.workflow_keys(wf)) == 0


async def test_unknown_route_is_a_404_problem(serve: Serve) -> None:
    base = await serve()
    async with aiohttp.ClientSession() as s, s.get(f"{base}/nowhere") as resp:
        assert_problem(resp.status, dict(resp.headers), await resp.json(content_type=None), 404)


async def test_health_and_readiness(serve: Serve) -> None:
    base = await serve()
    async with aiohttp.ClientSession() as s:
        for path in ("/healthz", "/readyz"):
            async with s.get(base + path) as resp:
                assert resp.status == 200
