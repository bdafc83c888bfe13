"""Hostile input over real sockets: deep nesting, numbers out of range, CORS `*`, the OpenAPI
document a client generator reads, and a history hash fed endless node types.

Each case answers 4xx problem+json (never 500) and stores nothing, on every input path: the
HTTP body, the in-process publisher's dicts, and the legacy pub/sub bridge.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from server import app_keys, redis_keys
from server.legacy import legacy_key
from server.models import MAX_JSON_DEPTH, EventRejected
from server.progress import history, stats
from tests.conftest import Serve, prefixed_redis

PROBLEM = "application/problem+json"


def nested(depth: int, leaf: str = "1") -> str:
    """JSON text of `depth` arrays, one inside the other, around `leaf`."""
    return "[" * depth + leaf + "]" * depth


def completed(output: str) -> str:
    """A node_completed event (one level of nesting) whose `output` is the given JSON text."""
    return '{"event_type": "node_completed", "node_id": "n1", "output": ' + output + "}"


def deep_output(event_depth: int) -> str:
    """A node_completed event nesting exactly `event_depth` levels, counting itself."""
    # The event is level 1, `output` level 2, its `x` array level 3, and so on.
    return completed('{"x": ' + nested(event_depth - 2) + "}")


async def post(url: str, body: bytes) -> tuple[int, str, Any]:
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s, s.post(url, data=body, headers=headers) as resp:
        text = await resp.text()
        return resp.status, resp.headers.get("Content-Type", ""), json.loads(text) if text else None


async def assert_rejected(
    redis: Any, base: str, wf: str, body: bytes | str, status: int = 422
) -> dict[str, Any]:
    """POST `body`: `status` as problem+json, and the workflow's stream stays empty."""
    data = body.encode() if isinstance(body, str) else body
    got, content_type, problem = await post(f"{base}/workflows/{wf}/events", data)
    assert got == status, problem
    assert content_type.startswith(PROBLEM)
    assert problem["status"] == status
    assert await redis.xlen(redis_keys.stream_key(wf)) == 0
    result: dict[str, Any] = problem
    return result


async def stored(redis: Any, wf: str) -> list[dict[str, Any]]:
    rows = await redis.xrange(redis_keys.stream_key(wf))
    return [json.loads(fields[b"d"]) for _, fields in rows]


# Nesting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [990, 5_000])
async def test_an_array_nested_hundreds_deep_is_422_not_a_recursion_error(
    serve: Serve, redis: Any, new_workflow: Callable[[], str], depth: int
) -> None:
    base, wf = await serve(), new_workflow()
    problem = await assert_rejected(redis, base, wf, nested(depth))
    assert f"deeper than {MAX_JSON_DEPTH}" in problem["detail"]
    assert problem["errors"][0]["msg"].startswith("nested deeper than")


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 256, 900])
async def test_an_output_nested_past_the_limit_is_422_and_nothing_is_stored(
    serve: Serve, redis: Any, new_workflow: Callable[[], str], depth: int
) -> None:
    base, wf = await serve(), new_workflow()
    problem = await assert_rejected(redis, base, wf, deep_output(depth))
    assert f"deeper than {MAX_JSON_DEPTH}" in problem["detail"]


async def test_one_too_deep_event_rejects_its_whole_batch(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    # The batch array is one more level: each event still gets MAX_JSON_DEPTH of its own.
    ok = deep_output(MAX_JSON_DEPTH)
    await assert_rejected(redis, base, wf, f"[{ok}, {deep_output(MAX_JSON_DEPTH + 1)}]")
    status, _, body = await post(f"{base}/workflows/{wf}/events", f"[{ok}, {ok}]".encode())
    assert status == 201, body


async def test_an_event_at_the_nesting_limit_is_stored_and_read_back_whole(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    status, _, body = await post(
        f"{base}/workflows/{wf}/events", deep_output(MAX_JSON_DEPTH).encode()
    )
    assert status == 201, body
    [event] = await stored(redis, wf)
    assert event["output"] == json.loads(deep_output(MAX_JSON_DEPTH))["output"]


async def test_brackets_inside_strings_do_not_count_as_nesting(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    text = "[{" * 500 + '\\"]' + "\\\\" + '"[' * 3
    body = completed(json.dumps({"s": text, "t": '"{', "u": "\\"}))
    status, _, answer = await post(f"{base}/workflows/{wf}/events", body.encode())
    assert status == 201, answer
    [event] = await stored(redis, wf)
    assert event["output"]["s"] == text


@pytest.mark.parametrize("body", [b"[" * 100_000, b"{" * 3 + b"]" * 5_000, b'["' + b"[" * 5_000])
async def test_unbalanced_deep_brackets_are_malformed_json(
    serve: Serve, redis: Any, new_workflow: Callable[[], str], body: bytes
) -> None:
    base, wf = await serve(), new_workflow()
    await assert_rejected(redis, base, wf, body, status=400)


# Numbers that are not finite -------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "loc"),
    [
        ('{"x": 1e999999}', ["output", "x"]),
        ('{"a": [1, {"b": -1E+400}]}', ["output", "a", 1, "b"]),
        ('{"big": ' + "9" * 400 + ".5}", ["output", "big"]),
    ],
)
async def test_a_number_beyond_float_range_is_422_with_its_loc(
    serve: Serve, redis: Any, new_workflow: Callable[[], str], output: str, loc: list[Any]
) -> None:
    base, wf = await serve(), new_workflow()
    problem = await assert_rejected(redis, base, wf, completed(output))
    assert problem["errors"] == [{"loc": loc, "msg": "number is not finite (JSON has no Infinity)"}]
    batch = await assert_rejected(redis, base, wf, f"[{completed('{}')}, {completed(output)}]")
    assert batch["errors"][0]["loc"] == [1, *loc]


async def test_a_fraction_beyond_float_range_is_422(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    body = '{"event_type": "node_progress", "node_id": "n1", "fraction": 1e999}'
    problem = await assert_rejected(redis, base, wf, body)
    assert problem["errors"][0]["loc"] == ["fraction"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_nan_and_infinity_literals_are_malformed_json(
    serve: Serve, redis: Any, new_workflow: Callable[[], str], literal: str
) -> None:
    base, wf = await serve(), new_workflow()
    await assert_rejected(redis, base, wf, completed('{"x": ' + literal + "}"), status=400)


async def test_large_but_finite_numbers_are_stored_as_sent(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    output = '{"max": 1.7976931348623157e308, "tiny": 1e-400, "int": ' + "9" * 400 + ', "e": 2e+10}'
    status, _, body = await post(f"{base}/workflows/{wf}/events", completed(output).encode())
    assert status == 201, body
    [event] = await stored(redis, wf)
    assert event["output"] == {
        "max": 1.7976931348623157e308,
        "tiny": 0.0,
        "int": int("9" * 400),
        "e": 2e10,
    }


# The in-process publisher ----------------------------------------------------------------


def deep_list(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


async def test_the_python_publisher_rejects_deep_and_non_finite_dicts_with_the_same_errors(
    serve: Serve, redis: Any, new_workflow: Callable[[], str]
) -> None:
    await serve()
    publisher = serve.apps[0][app_keys.publisher_key]
    wf = new_workflow()
    node = {"event_type": "node_completed", "node_id": "n1"}
    for depth in (MAX_JSON_DEPTH - 1, 256, 100_000):  # the event and `output` are two levels
        with pytest.raises(EventRejected, match=f"deeper than {MAX_JSON_DEPTH}") as info:
            await publisher.publish(wf, {**node, "output": {"x": deep_list(depth)}})
        assert info.value.errors[0]["msg"].startswith("nested deeper than")
    for bad in (math.inf, -math.inf, math.nan):
        with pytest.raises(EventRejected, match="not finite") as info:
            await publisher.publish_many(wf, [node, {**node, "output": {"a": [0, {"b": bad}]}}])
        assert info.value.errors == [
            {
                "loc": [1, "output", "a", 1, "b"],
                "msg": "number is not finite (JSON has no Infinity)",
            }
        ]
    with pytest.raises(EventRejected, match="not finite") as info:
        await publisher.publish(
            wf, {"event_type": "node_progress", "node_id": "n", "fraction": math.nan}
        )
    assert info.value.errors[0]["loc"] == ["fraction"]
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(EventRejected, match="deeper than"):
        await publisher.publish(wf, {**node, "output": loop})
    assert await redis.xlen(redis_keys.stream_key(wf)) == 0
    await publisher.publish(wf, {**node, "output": {"x": deep_list(MAX_JSON_DEPTH - 2)}})
    assert await redis.xlen(redis_keys.stream_key(wf)) == 1


# The legacy bridge -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (nested(5_000), f"deeper than {MAX_JSON_DEPTH}"),
        (deep_output(256), f"deeper than {MAX_JSON_DEPTH}"),
        (completed('{"x": 1e999999}'), "output.x: number is not finite"),
    ],
)
async def test_the_legacy_bridge_counts_deep_and_non_finite_messages_as_invalid(
    serve: Serve,
    redis: Any,
    new_workflow: Callable[[], str],
    caplog: pytest.LogCaptureFixture,
    message: str,
    reason: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="server.legacy")
    await serve(legacy_ingest=True)
    ingest = serve.apps[0][legacy_key]
    await asyncio.wait_for(ingest.ready.wait(), 10)
    wf = new_workflow()
    await redis.publish(f"workflow:{wf}:events", message)
    for _ in range(200):
        if ingest.received:
            break
        await asyncio.sleep(0.025)
    assert (ingest.received, ingest.invalid, ingest.failed) == (1, 1, 0)
    assert any(reason in r.getMessage() for r in caplog.records), caplog.text
    assert await redis.xlen(redis_keys.stream_key(wf)) == 0


# CORS ------------------------------------------------------------------------------------


async def test_cors_star_answers_any_origin_with_star_and_no_credentials(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(cors_origins=("*", "https://dash.example")), new_workflow()
    url = f"{base}/workflows/{wf}/progress"
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers={"Origin": "https://any.example"}) as resp:
            assert resp.status == 404 and resp.content_type == PROBLEM
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            assert "Access-Control-Allow-Credentials" not in resp.headers
            assert resp.headers["Vary"] == "Origin"
        preflight = {"Origin": "https://any.example", "Access-Control-Request-Method": "GET"}
        async with s.options(url, headers=preflight) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            assert "Access-Control-Allow-Credentials" not in resp.headers
        # A listed origin keeps credentials, so its pages can send the access_token cookie.
        async with s.get(url, headers={"Origin": "https://dash.example"}) as resp:
            assert resp.headers["Access-Control-Allow-Origin"] == "https://dash.example"
            assert resp.headers["Access-Control-Allow-Credentials"] == "true"


# OpenAPI ---------------------------------------------------------------------------------


async def openapi_of(base: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{base}/openapi.json") as resp:
        assert resp.status == 200
        doc: dict[str, Any] = await resp.json()
        return doc


def refs_in(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in refs_in(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs_in(v)]
    return []


async def test_openapi_component_schemas_have_unique_titles_and_every_ref_resolves(
    serve: Serve,
) -> None:
    doc = await openapi_of(await serve())
    schemas = doc["components"]["schemas"]
    titles = [schema.get("title", name) for name, schema in schemas.items()]
    assert sorted(titles) == sorted(set(titles)), titles
    assert all(schema.get("title") == name for name, schema in schemas.items())
    bodies = [json.dumps(schema, sort_keys=True) for schema in schemas.values()]
    assert len(bodies) == len(set(bodies))  # no schema twice under two names
    for ref in refs_in(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    assert {"Progress", "Gap", "RunningNode", "Event", "EventMessage"} <= schemas.keys()


async def test_openapi_python_client_generates_a_model_for_gap_and_progress(
    serve: Serve, tmp_path: Path
) -> None:
    tool = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    if tool is None:
        pytest.skip("openapi-python-client is not installed (pip install -e .[test])")
    base = await serve()
    out = tmp_path / "client"
    # A subprocess the loop awaits: the live server keeps answering while it reads the URL.
    proc = await asyncio.create_subprocess_exec(
        tool,
        "generate",
        "--url",
        f"{base}/openapi.json",
        "--output-path",
        str(out),
        "--meta",
        "none",
        "--fail-on-warning",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    assert proc.returncode == 0, output
    assert "duplicate" not in output.lower() and "warning" not in output.lower(), output
    models = {p.stem for p in (out / "models").glob("*.py")}
    assert {"gap", "progress", "running_node", "node_completed"} <= models, models


# The duration history's hashes -----------------------------------------------------------


@pytest.fixture(params=["fakeredis", "redis"])
async def hist(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, str]]:
    """(client, unique key prefix); every key under the prefix is deleted afterwards."""
    async with prefixed_redis(request.param) as pair:
        yield pair


async def test_the_node_type_hash_stays_under_its_cap_and_keeps_the_busy_types(
    hist: tuple[Redis, str],
) -> None:
    redis, prefix = hist
    cap = history.MAX_HISTORY_FIELDS
    key = redis_keys.history_types_key(prefix=prefix)
    # A hash already full of one-off types, as 10,000 workflows of junk publishers leave it.
    recent = redis_keys.history_recent_key(key, prefix=prefix)
    await redis.hset(key, mapping={f"junk-{i}": "1 0.0 0.0" for i in range(cap)})
    await redis.hset(recent, mapping={f"junk-{i}": "1 0 0 5 " for i in range(cap)})
    busy = [(None, "n", "busy", 2.0)] * 5
    await history.record(redis, busy, ttl_seconds=60, prefix=prefix)
    for batch in range(3):
        items = [(None, "n", f"new-{batch}-{i}", 1.0) for i in range(500)]
        await history.record(redis, items + busy, ttl_seconds=60, prefix=prefix)  # never raises
        assert await redis.hlen(key) <= cap
        assert await redis.hlen(recent) <= cap
    view = await history.load(redis, None, [], ["busy", "new-2-499"], prefix=prefix)
    assert view.types["busy"].count == 20  # a type in use is not the one evicted
    assert "new-2-499" in view.types  # a new type still gets history once the hash is full
    assert await redis.ttl(key) > 0
    # The recent records (the statistics' percentiles) are held to the same cap, the same way.
    busy_recent = stats.decode_recent(await redis.hget(recent, "busy"))
    assert busy_recent is not None and busy_recent.runs == 20
    assert await redis.hexists(recent, "new-2-499")
    assert await redis.ttl(recent) > 0


async def test_a_definition_hash_stays_under_its_cap_when_node_ids_never_repeat(
    hist: tuple[Redis, str],
) -> None:
    redis, prefix = hist
    cap = history.MAX_HISTORY_FIELDS
    for run in range(3):  # node ids made up per run: the definition would grow without end
        items = [("def-x", f"run{run}-n{i}", None, 1.0) for i in range(cap // 2 + 1)]
        await history.record(redis, items, ttl_seconds=60, prefix=prefix)
    key = redis_keys.history_definition_key("def-x", prefix=prefix)
    assert await redis.hlen(key) == cap
    assert await redis.hlen(redis_keys.history_recent_key(key, prefix=prefix)) == cap
