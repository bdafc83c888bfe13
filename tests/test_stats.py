"""Node statistics: GET /definitions/{id}/stats from the duration history, and what it keeps."""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Callable
from contextlib import redirect_stdout
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import jwt
import pytest

from server import auth, progress, redis_keys
from server.models import event_adapter
from server.progress import history, stats
from testing.http import publish
from tests.conftest import HISTORY_PREFIX, Serve

pytestmark = pytest.mark.backends("fakeredis", "redis", "cluster")

JSON = {"Content-Type": "application/json"}
SECRET = "sub-" + "s" * 60


class Used:
    """Unique definition ids and node types, so that tests sharing the session's history
    never see each other's."""

    def definition(self) -> str:
        return "d-" + uuid.uuid4().hex[:12]

    def type(self, name: str) -> str:
        return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def used() -> Used:
    """Unique names for the test (the session deletes its history at its end)."""
    return Used()


async def get_stats(
    base: str, definition: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{base}/definitions/{definition}/stats", headers=headers) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


def run_events(
    definition: str, kinds: dict[str, str], durations: dict[str, int], failures: dict[str, int]
) -> list[dict[str, Any]]:
    """One run: a plan, each node failing `failures[n]` times before it completes in
    `durations[n]` ms, then COMPLETED."""
    events: list[dict[str, Any]] = [
        {
            "event_type": "workflow_planned",
            "definition_id": definition,
            "nodes": [{"node_id": n, "node_type": kinds[n]} for n in kinds],
        }
    ]
    for node, ms in durations.items():
        for _ in range(failures.get(node, 0)):
            events.append({"event_type": "node_started", "node_id": node})
            events.append({"event_type": "node_failed", "node_id": node, "error": "boom"})
        events.append({"event_type": "node_started", "node_id": node})
        events.append({"event_type": "node_completed", "node_id": node, "duration_ms": ms})
    events.append({"event_type": "workflow_state_changed", "to_state": "COMPLETED"})
    return events


async def test_stats_match_the_durations_published(
    serve: Serve, new_workflow: Callable[[], str], used: Used
) -> None:
    base, definition = await serve(), used.definition()
    fetch, train = used.type("fetch"), used.type("train")
    kinds = {"load": fetch, "fit": train, "품질 판정": fetch}
    failures_of_fit = [0, 1, 0, 0, 2, 0, 0, 0, 1, 0]  # 4 failed attempts over 10 runs
    before = datetime.now(UTC)
    for i in range(10):
        durations = {"load": 1000 * (i + 1), "fit": 200, "품질 판정": 3000}
        await publish(
            base,
            new_workflow(),
            run_events(definition, kinds, durations, {"fit": failures_of_fit[i]}),
        )
    status, headers, body = await get_stats(base, definition)
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/json")
    assert body["definition_id"] == definition
    nodes = {n["node_id"]: n for n in body["nodes"]}
    assert [n["node_id"] for n in body["nodes"]] == sorted(kinds)
    load = nodes["load"]
    assert load["node_type"] == fetch
    assert (load["runs"], load["failure_rate"]) == (10, 0.0)
    assert load["p50_seconds"] == 5.5  # 1 s .. 10 s: the median is between 5 and 6
    assert load["p90_seconds"] == 9.1  # linear interpolation between the 9th and 10th
    fit = nodes["fit"]
    assert fit["runs"] == 10
    assert fit["failure_rate"] == round(4 / 14, 4)  # 4 failed attempts beside 10 runs
    assert fit["p50_seconds"] == fit["p90_seconds"] == 0.2
    assert nodes["품질 판정"]["p50_seconds"] == 3.0
    last_seen = datetime.fromisoformat(load["last_seen"])
    assert before - timedelta(seconds=1) <= last_seen <= datetime.now(UTC) + timedelta(seconds=1)
    types = {t["node_type"]: t for t in body["node_types"]}
    assert set(types) == {fetch, train}
    # The node-type history pools both `fetch` nodes: 10 runs of 1..10 s and 10 of 3 s.
    pooled = sorted([float(i + 1) for i in range(10)] + [3.0] * 10)
    assert types[fetch]["runs"] == 20
    assert types[fetch]["p50_seconds"] == round(stats.percentile(pooled, 0.5) or 0, 3)
    assert types[fetch]["p90_seconds"] == round(stats.percentile(pooled, 0.9) or 0, 3)
    assert (types[train]["runs"], types[train]["failure_rate"]) == (10, round(4 / 14, 4))
    assert set(nodes["load"]) == {
        "node_id",
        "node_type",
        "runs",
        "p50_seconds",
        "p90_seconds",
        "failure_rate",
        "last_seen",
    }


async def test_a_node_that_only_failed_has_a_failure_rate_and_no_percentiles(
    serve: Serve, new_workflow: Callable[[], str], used: Used
) -> None:
    base, definition, kind = await serve(), used.definition(), used.type("flaky")
    wf = new_workflow()
    await publish(
        base,
        wf,
        [
            {
                "event_type": "workflow_planned",
                "definition_id": definition,
                "nodes": [{"node_id": "x", "node_type": kind}],
            },
            {"event_type": "node_started", "node_id": "x"},
            {"event_type": "node_failed", "node_id": "x", "error": "e"},
            {"event_type": "node_failed", "node_id": "x", "error": "the same failure, again"},
        ],
    )
    # Counted as it happens (the run has not ended), once for the repeated event.
    status, _, body = await get_stats(base, definition)
    assert status == 200, body
    (node,) = body["nodes"]
    assert (node["runs"], node["failure_rate"]) == (0, 1.0)
    assert node["p50_seconds"] is None and node["p90_seconds"] is None
    assert body["node_types"][0]["node_type"] == kind


async def test_unknown_definition_is_404_and_a_bad_id_400(serve: Serve, used: Used) -> None:
    base = await serve()
    status, headers, body = await get_stats(base, used.definition())
    assert status == 404 and headers["Content-Type"].startswith("application/problem+json")
    assert body["type"] == "/problems/unknown-definition"
    for bad in ("a:b", "-x", "x" * 129, "a%7Bb%7D", "%E2%82%AC"):
        status, headers, body = await get_stats(base, bad)
        assert status == 400, bad
        assert headers["Content-Type"].startswith("application/problem+json")
        assert body["type"] == "/problems/bad-definition-id"


def forge(claims: dict[str, Any]) -> dict[str, str]:
    claims = {"exp": int(time.time()) + 600, **claims}
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET)}"}


async def test_stats_need_the_star_entry_or_a_definitions_claim(
    serve: Serve, new_workflow: Callable[[], str], used: Used
) -> None:
    base = await serve(subscribe_secret=SECRET, publish_token="p" * 40)
    definition, other = used.definition(), used.definition()
    kind = used.type("t")
    events = run_events(definition, {"n": kind}, {"n": 1500}, {})
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{base}/workflows/{new_workflow()}/events",
            data=json.dumps(events),
            headers={**JSON, "Authorization": f"Bearer {'p' * 40}"},
        ) as resp,
    ):
        assert resp.status == 201
    wf = new_workflow()
    cases: list[tuple[dict[str, str] | None, int]] = [
        (None, 401),
        (forge({"workflows": [wf]}), 403),  # a workflow grant is not a definition grant
        (forge({"workflows": [], "definitions": [other]}), 403),
        (forge({"workflows": [], "definitions": "*"}), 401),  # not a list
        (forge({"definitions": [definition]}), 401),  # no workflows list: not a valid token
        (forge({"workflows": ["*"]}), 200),
        (forge({"workflows": [], "definitions": [other, definition]}), 200),
    ]
    for headers, expected in cases:
        status, got, body = await get_stats(base, definition, headers)
        assert status == expected, (headers, body)
        if expected != 200:
            assert got["Content-Type"].startswith("application/problem+json")
            assert "p50_seconds" not in json.dumps(body)
    status, _, body = await get_stats(base, definition, forge({"workflows": ["*"]}))
    assert body["nodes"][0]["p50_seconds"] == 1.5
    # The token is checked before the history is read: an unknown one is 403, not 404.
    status, _, body = await get_stats(base, used.definition(), forge({"workflows": [wf]}))
    assert status == 403 and body["type"] == "/problems/forbidden-definition"


def test_the_token_cli_mints_a_definitions_claim() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        code = auth.token_main(["--definition", "etl", "--subscribe-secret", SECRET], {})
    assert code == 0
    claims = jwt.decode(out.getvalue().strip(), SECRET, algorithms=["HS256"])
    assert claims["workflows"] == [] and claims["definitions"] == ["etl"]
    auth.check_stats(out.getvalue().strip(), SECRET, "etl")
    with pytest.raises(auth.AuthFailed):
        auth.check_stats(out.getvalue().strip(), SECRET, "other")
    with pytest.raises(ValueError, match="not a definition id"):
        auth.mint(SECRET, [], 60, definitions=["a:b"])


# What the history keeps --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 0.5, None),
        ([4.0], 0.9, 4.0),
        ([1.0, 2.0], 0.5, 1.5),
        ([3.0, 1.0, 2.0], 0.5, 2.0),
        ([float(i) for i in range(1, 11)], 0.9, 9.1),
        ([float(i) for i in range(1, 11)], 0.0, 1.0),
        ([float(i) for i in range(1, 11)], 1.0, 10.0),
    ],
)
def test_percentile_interpolates_between_order_statistics(
    values: list[float], q: float, expected: float | None
) -> None:
    got = stats.percentile(values, q)
    assert got == (None if expected is None else pytest.approx(expected))


async def test_the_recent_record_keeps_the_last_durations_and_counts_every_run(
    redis: Any, used: Used
) -> None:
    definition, kind = used.definition(), used.type("k")
    prefix = HISTORY_PREFIX
    total = history.KEEP_DURATIONS + 20
    for i in range(total):
        item = (definition, "n", kind, float(i + 1))
        await history.record(redis, [item], ttl_seconds=60, prefix=prefix, now=1_700_000_000.5)
    nodes, types = await stats.load_recent(redis, definition, prefix=prefix)
    node = nodes["n"]
    assert node.runs == total and node.failures == 0
    expected = tuple(float(i + 1) for i in range(20, total))  # the oldest 20 made room
    assert node.durations == expected
    assert node.node_type == kind and types[kind].durations == expected
    assert stats.figures(node)["last_seen"] == "2023-11-14T22:13:20.500Z"
    key = redis_keys.history_definition_key(definition, prefix=prefix)
    assert 0 < await redis.ttl(redis_keys.history_recent_key(key, prefix=prefix)) <= 60
    # The ETA's log-stats are as before: Welford over the same durations.
    view = await history.load(redis, definition, ["n"], [kind], prefix=prefix)
    logstats = view.for_node(definition, "n")
    assert logstats is not None and logstats.count == min(total, history.MAX_COUNT)


async def test_failed_attempts_are_counted_apart_from_the_eta_history(
    redis: Any, used: Used
) -> None:
    definition, kind = used.definition(), used.type("k")
    prefix = HISTORY_PREFIX
    failed = (definition, "n", kind, history.FAILED_ATTEMPT)
    await history.record(redis, [failed, failed, failed], ttl_seconds=60, prefix=prefix)
    view = await history.load(redis, definition, ["n"], [kind], prefix=prefix)
    assert view.empty  # a failure is no duration: the ETA sees nothing
    await history.record(redis, [(definition, "n", None, 2.0)], ttl_seconds=60, prefix=prefix)
    nodes, _ = await stats.load_recent(redis, definition, prefix=prefix)
    n = nodes["n"]
    assert (n.runs, n.failures, n.durations) == (1, 3, (2.0,))
    assert n.node_type == kind  # an item without a type keeps the one known


async def test_a_big_run_is_recorded_in_chunks_and_odd_names_round_trip(
    redis: Any, used: Used
) -> None:
    definition, prefix = used.definition(), HISTORY_PREFIX
    odd = used.type("품질 판정 \n with spaces")
    count = history.RECORD_CHUNK * 2 + 500
    items = [(definition, f"n{i}", odd, 0.25) for i in range(count)]
    await history.record(redis, items, ttl_seconds=60, prefix=prefix)
    nodes, types = await stats.load_recent(redis, definition, prefix=prefix)
    assert len(nodes) == count
    assert {n.node_type for n in nodes.values()} == {odd}
    assert types[odd].runs == count
    assert len(types[odd].durations) == history.KEEP_DURATIONS
    body = stats.definition_stats(definition, nodes, types)
    assert body["nodes"][0]["p90_seconds"] == 0.25


def _event(**fields: Any) -> Any:
    return event_adapter.validate_python(
        {"timestamp": datetime(2026, 1, 1, tzinfo=UTC), **fields}, strict=False
    )


def test_a_failed_attempt_is_a_history_item_at_once_and_its_repeat_is_not() -> None:
    state = progress.new_state()
    plan = _event(
        event_type="workflow_planned",
        definition_id="d",
        nodes=[{"node_id": "a", "node_type": "t"}],
    )
    progress.fold(state, plan)
    progress.fold(state, _event(event_type="node_started", node_id="a"))
    failed = _event(event_type="node_failed", node_id="a", error="x")
    assert progress.history_items(state, failed) == [("d", "a", "t", history.FAILED_ATTEMPT)]
    progress.fold(state, failed)
    assert progress.history_items(state, failed) == []
    progress.fold(state, _event(event_type="node_started", node_id="a"))
    assert progress.history_items(state, failed) == [("d", "a", "t", history.FAILED_ATTEMPT)]
    # Nothing to key it by: no item.
    bare = progress.new_state()
    assert (
        progress.history_items(bare, _event(event_type="node_failed", node_id="z", error="e")) == []
    )
