"""The retained history as JSON pages: GET /workflows/{id}/events with Accept: application/json."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
import pytest

from server import redis_keys, store
from testing.events import DONE, started
from testing.http import publish
from tests.conftest import Serve

pytestmark = pytest.mark.backends("fakeredis", "redis", "cluster")

JSON = {"Content-Type": "application/json"}
ACCEPT = {"Accept": "application/json"}
SECRET = "sub-" + "s" * 60
MAX_ID = f"{2**64 - 1}-{2**64 - 1}"


async def page(
    base: str, wf: str, headers: dict[str, str] | None = None, /, **query: str
) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{base}/workflows/{wf}/events", params=query, headers=headers or ACCEPT) as resp,
    ):
        raw = await resp.read()
        return resp.status, dict(resp.headers), json.loads(raw) if raw else None


async def walk(base: str, wf: str, limit: int) -> list[dict[str, Any]]:
    """Every page from the beginning, following `next` until it is null."""
    events: list[dict[str, Any]] = []
    query: dict[str, str] = {"limit": str(limit)}
    while True:
        status, _, body = await page(base, wf, **query)
        assert status == 200, body
        assert len(body["events"]) <= limit
        events += body["events"]
        if body["next"] is None:
            return events
        assert body["next"] == body["events"][-1]["id"]
        query["after"] = body["next"]


async def test_a_page_is_the_stored_json_with_its_id_first_in_raw_utf8(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    ids = await publish(base, wf, [started("n1", node_name="품질 판정"), started("n2")])
    rows = await redis.xrange(redis_keys.stream_key(wf))
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{base}/workflows/{wf}/events", headers=ACCEPT) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["Vary"] == "Accept"
        raw = await resp.read()
    expected = (
        b'{"events":['
        + b",".join(
            b'{"id":"' + i.encode() + b'",' + f[b"d"][1:]
            for i, (_, f) in zip(ids, rows, strict=True)
        )
        + b'],"next":null,"earliest_available":"'
        + ids[0].encode()
        + b'"}'
    )
    assert raw == expected
    assert "품질 판정".encode() in raw
    body = json.loads(raw)
    assert [e["id"] for e in body["events"]] == ids
    assert body["events"][0] == {"id": ids[0], **json.loads(rows[0][1][b"d"])}


async def test_a_walk_returns_every_retained_event_once_in_order(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    ids: list[str] = []
    for batch in range(5):
        ids += await publish(base, wf, [started(f"n{batch}-{i}") for i in range(5)])
    for limit in (1, 7, 25, 100):
        events = await walk(base, wf, limit)
        assert [e["id"] for e in events] == ids
        assert [e["node_id"] for e in events] == [f"n{b}-{i}" for b in range(5) for i in range(5)]


async def test_a_walk_during_concurrent_publishing_skips_and_repeats_nothing(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    before = await publish(base, wf, [started(f"a{i}") for i in range(30)])

    async def writer() -> list[str]:
        out: list[str] = []
        for i in range(20):
            out += await publish(base, wf, [started(f"b{i}")])
            await asyncio.sleep(0)
        return out

    writing = asyncio.create_task(writer())
    events = await walk(base, wf, 3)
    during = await writing
    seen = [e["id"] for e in events]
    assert len(seen) == len(set(seen))
    assert seen == sorted(seen, key=store.id_key)
    assert seen[: len(before)] == before
    assert set(seen[len(before) :]) <= set(during)
    # What the walk did not reach yet, the next page after its last id holds: nothing lost.
    status, _, rest = await page(base, wf, after=seen[-1], limit="1000")
    assert status == 200
    assert seen + [e["id"] for e in rest["events"]] == before + during


async def test_limit_defaults_to_100_and_goes_up_to_1000(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    ids = await publish(base, wf, [started(f"n{i}") for i in range(1000)])
    ids += await publish(base, wf, [started("last")])
    status, _, body = await page(base, wf)
    assert status == 200
    assert [e["id"] for e in body["events"]] == ids[:100]
    assert body["next"] == ids[99]
    status, _, body = await page(base, wf, limit="1000")
    assert [e["id"] for e in body["events"]] == ids[:1000]
    assert body["next"] == ids[999]
    status, _, body = await page(base, wf, after=body["next"], limit="1000")
    assert [e["id"] for e in body["events"]] == ids[1000:]
    assert body["next"] is None


async def test_the_end_of_the_history_is_an_empty_page_with_no_next(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    ids = await publish(base, wf, [started("a"), DONE])
    for after in (ids[-1], MAX_ID):
        status, _, body = await page(base, wf, after=after)
        assert status == 200
        assert body == {"events": [], "next": None, "earliest_available": ids[0]}
    # A page exactly as long as what is left has no next either: nothing follows it.
    status, _, body = await page(base, wf, limit="2")
    assert [e["id"] for e in body["events"]] == ids and body["next"] is None


async def test_trimmed_history_is_announced_on_the_page(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(history_maxlen=5), new_workflow()
    ids = await publish(base, wf, [started(f"n{i}") for i in range(8)])
    status, _, body = await page(base, wf, after=ids[0])
    assert status == 200
    assert [e["id"] for e in body["events"]] == ids[3:]
    # Events after `after` are gone: the first retained one is not the one after it.
    assert body["earliest_available"] == ids[3] != ids[1]
    # From the beginning (no `after`), or after the newest trimmed id: nothing was missed.
    for query in ({}, {"after": ids[2]}):
        status, _, body = await page(base, wf, **query)
        assert [e["id"] for e in body["events"]] == ids[3:]
        assert body["earliest_available"] == ids[3]


async def test_unknown_workflow_is_404(serve: Serve, new_workflow: Callable[[], str]) -> None:
    base = await serve()
    for query in ({}, {"after": "1-0"}):
        status, headers, body = await page(base, new_workflow(), **query)
        assert status == 404
        assert headers["Content-Type"].startswith("application/problem+json")
        assert body["type"] == "/problems/unknown-workflow"


@pytest.mark.parametrize(
    ("query", "slug"),
    [
        ({"after": "abc"}, "bad-event-id"),
        ({"after": "1-"}, "bad-event-id"),
        ({"after": "1-2-3"}, "bad-event-id"),
        ({"after": f"{2**64}-0"}, "bad-event-id"),
        ({"limit": "0"}, "bad-limit"),
        ({"limit": "1001"}, "bad-limit"),
        ({"limit": "-1"}, "bad-limit"),
        ({"limit": "1.5"}, "bad-limit"),
        ({"limit": "ten"}, "bad-limit"),
        ({"limit": "\u0661\u0660"}, "bad-limit"),  # Arabic-Indic digits: str.isdigit() says yes
        ({"limit": "99999999999999999999"}, "bad-limit"),
        ({"limit": ""}, "bad-limit"),  # the document says integer: empty is not the default
        ({"limit": " 5"}, "bad-limit"),
    ],
)
async def test_bad_after_or_limit_is_a_400_problem_in_either_form(
    serve: Serve, new_workflow: Callable[[], str], query: dict[str, str], slug: str
) -> None:
    base, wf = await serve(), new_workflow()
    await publish(base, wf, [started("a")])
    for accept in ("application/json", "text/event-stream"):
        status, headers, body = await page(base, wf, {"Accept": accept}, **query)
        assert status == 400, (accept, body)
        assert headers["Content-Type"].startswith("application/problem+json")
        assert body["type"] == f"/problems/{slug}"
        assert body["errors"][0]["loc"] == ["query", next(iter(query))]


@pytest.mark.parametrize(
    ("accept", "form"),
    [
        ("application/json", "json"),
        ("Application/JSON; q=1", "json"),
        ("application/json, text/event-stream", "sse"),
        ("text/event-stream", "sse"),
        ("*/*", "sse"),
        ("", "sse"),
    ],
)
async def test_json_only_when_asked_for_without_text_event_stream(
    serve: Serve, new_workflow: Callable[[], str], accept: str, form: str
) -> None:
    base, wf = await serve(), new_workflow()
    await publish(base, wf, [started("a"), DONE])
    headers = {"Accept": accept} if accept else {}
    async with (
        aiohttp.ClientSession(skip_auto_headers=["Accept"]) as s,
        s.get(f"{base}/workflows/{wf}/events", headers=headers) as resp,
    ):
        assert resp.status == 200
        kind = resp.headers["Content-Type"]
        assert kind.startswith("application/json" if form == "json" else "text/event-stream")


def token(workflows: list[str]) -> str:
    return jwt.encode({"workflows": workflows, "exp": int(time.time()) + 600}, SECRET)


async def test_a_token_for_one_workflow_never_reads_another(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base = await serve(subscribe_secret=SECRET)
    a, b = new_workflow(), new_workflow()
    await publish(base, a, [started("in-a")])
    await publish(base, b, [started("in-b")])
    bearer = {**ACCEPT, "Authorization": f"Bearer {token([a])}"}
    status, _, body = await page(base, a, bearer)
    assert status == 200 and body["events"][0]["node_id"] == "in-a"
    status, headers, body = await page(base, b, bearer)
    assert status == 403 and headers["Content-Type"].startswith("application/problem+json")
    assert "in-b" not in json.dumps(body)
    status, _, body = await page(base, b, access_token=token([a]))
    assert status == 403
    status, headers, _ = await page(base, a)
    assert status == 401 and "WWW-Authenticate" in headers
    status, _, body = await page(base, b, access_token=token(["*"]))
    assert status == 200 and body["events"][0]["node_id"] == "in-b"
    # The token is checked before anything else: no 404 or 400 tells a stranger anything.
    status, _, _ = await page(base, new_workflow(), bearer, limit="0")
    assert status == 403


@pytest.mark.parametrize("query", ["limit=5&limit=6", "limit=&limit=5", "after=1-0&after=2-0"])
async def test_a_parameter_given_twice_is_a_400_problem_in_either_form(
    serve: Serve, new_workflow: Callable[[], str], query: str
) -> None:
    """Which of two values would count is a guess: neither is taken silently."""
    base, wf = await serve(), new_workflow()
    await publish(base, wf, [started("a")])
    async with aiohttp.ClientSession() as s:
        for accept in ("application/json", "text/event-stream"):
            async with s.get(
                f"{base}/workflows/{wf}/events?{query}", headers={"Accept": accept}
            ) as r:
                body = await r.json()
                assert (r.status, body["type"]) == (400, "/problems/repeated-parameter"), body
                assert body["errors"][0]["loc"] == ["query", query.split("=")[0]]
