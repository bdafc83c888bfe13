"""/metrics rendering and the generated OpenAPI document, checked against the real server."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, get_args

import fakeredis
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server import models, wire
from server.app import create_app
from server.fanout.upstream import parse_message
from server.metrics import FANOUT_BUCKETS, NAMESPACE, Metrics
from server.openapi import openapi_document, openapi_handler
from server.settings import Settings
from tests.conftest import HISTORY_PREFIX

ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]

METRIC_NAMES = [
    "open_streams",
    "events_published_total",
    "events_delivered_total",
    "fanout_delay_seconds_bucket",
    "fanout_delay_seconds_sum",
    "fanout_delay_seconds_count",
    "replays_total",
    "gaps_total",
    "slow_client_catchups_total",
    "redis_reconnects_total",
    "auth_failures_total",
    "legacy_ingest_invalid_total",
]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_every_metric_name_is_rendered() -> None:
    metrics = Metrics()
    metrics.auth_failed("subscribe", "expired")  # a labelled counter shows once it has a child
    text = metrics.render().decode()
    for name in METRIC_NAMES:
        assert re.search(rf"^{NAMESPACE}_{name}[{{ ]", text, re.M), name
    for kind in ("events", "progress", "websocket"):
        assert f'{NAMESPACE}_open_streams{{kind="{kind}"}} 0.0' in text


def test_metrics_count_what_they_are_told() -> None:
    metrics = Metrics(process=False)
    metrics.events_published_total.inc(3)
    metrics.events_delivered_total.inc(5)
    metrics.gaps_total.inc()
    metrics.auth_failed("publish", "wrong_token")
    metrics.auth_failed("publish", "wrong_token")
    with metrics.open_streams.labels("events").track_inprogress():
        assert (
            samples(metrics.render().decode())[(f"{NAMESPACE}_open_streams", (("kind", "events"),))]
            == 1
        )
    got = samples(metrics.render().decode())
    assert got[(f"{NAMESPACE}_open_streams", (("kind", "events"),))] == 0
    assert got[(f"{NAMESPACE}_events_published_total", ())] == 3
    assert got[(f"{NAMESPACE}_events_delivered_total", ())] == 5
    assert got[(f"{NAMESPACE}_gaps_total", ())] == 1
    key = (f"{NAMESPACE}_auth_failures_total", (("kind", "publish"), ("reason", "wrong_token")))
    assert got[key] == 2


def test_fanout_delay_is_measured_from_the_event_id() -> None:
    metrics = Metrics(process=False)
    frames = [parse_message(f"1769077817000-{i} node_started 0 {{}}".encode()) for i in (3, 4)]
    metrics.observe_frames(frames[:1], now=1769077817.004)  # 4 ms
    metrics.observe_frames(frames[1:], now=1769077816.0)  # clock skew: clamped to 0
    got = samples(metrics.render().decode())
    name = f"{NAMESPACE}_fanout_delay_seconds"
    assert got[(f"{name}_count", ())] == 2
    assert got[(f"{name}_sum", ())] == pytest.approx(0.004, abs=1e-6)
    assert got[(f"{name}_bucket", (("le", "0.0005"),))] == 1
    assert got[(f"{name}_bucket", (("le", "0.005"),))] == 2
    assert FANOUT_BUCKETS[0] == 0.0005 and FANOUT_BUCKETS[-1] == 10.0


def test_two_registries_do_not_collide() -> None:
    first, second = Metrics(), Metrics()
    first.replays_total.inc()
    assert samples(first.render().decode())[(f"{NAMESPACE}_replays_total", ())] == 1
    assert samples(second.render().decode())[(f"{NAMESPACE}_replays_total", ())] == 0


async def test_metrics_handler_over_the_wire(aiohttp_client: ClientFactory) -> None:
    metrics = Metrics()
    metrics.redis_reconnects_total.inc()
    app = web.Application()
    app.router.add_get("/metrics", metrics.handler)
    client = await aiohttp_client(app)
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    assert f"{NAMESPACE}_redis_reconnects_total 1.0" in await resp.text()


# OpenAPI -----------------------------------------------------------------------------------

EVENT_TYPES = {
    get_args(m.model_fields["event_type"].annotation)[0]
    for m in get_args(get_args(models.Event)[0])
}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return openapi_document()


def test_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    assert doc["openapi"] == "3.1.0"
    validator.validate(doc)
    json.dumps(doc)  # plain JSON all the way down


def test_document_has_every_path_and_method(doc: dict[str, Any]) -> None:
    paths = {p: set(ops) - {"parameters"} for p, ops in doc["paths"].items()}
    assert paths == {
        "/workflows": {"get"},
        "/workflows/{workflow_id}/events": {"get", "post"},
        "/workflows/{workflow_id}/progress": {"get"},
        "/workflows/{workflow_id}/schedule": {"get"},
        "/definitions/{definition_id}/stats": {"get"},
        "/workflows/{workflow_id}/ws": {"get"},
        "/api/v1/workflows/ws/{instance_id}": {"get"},
        "/healthz": {"get"},
        "/readyz": {"get"},
        "/metrics": {"get"},
        "/openapi.json": {"get"},
    }


def test_workflow_id_parameter_carries_the_spec_pattern(doc: dict[str, Any]) -> None:
    for path in ("/workflows/{workflow_id}/events", "/workflows/{workflow_id}/progress"):
        (param,) = doc["paths"][path]["parameters"]
        assert param["in"] == "path" and param["required"] is True
        pattern = param["schema"]["pattern"]
        assert pattern == r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
        assert pattern == f"^{models.WORKFLOW_ID_RE.pattern}$"


def test_event_schema_is_a_discriminated_union_of_every_event_type(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    event = schemas["Event"]
    assert event["discriminator"]["propertyName"] == "event_type"
    mapping = event["discriminator"]["mapping"]
    assert set(mapping) == EVENT_TYPES
    assert len(event["oneOf"]) == len(EVENT_TYPES)
    for tag, ref in mapping.items():
        target = schemas[ref.rsplit("/", 1)[1]]
        assert target["properties"]["event_type"]["const"] == tag
        assert target["additionalProperties"] is False
        assert target["properties"]["workflow_id"]["anyOf"][0]["pattern"].startswith("^[A-Za-z0-9]")


def test_streams_describe_one_sse_message_each(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    events = doc["paths"]["/workflows/{workflow_id}/events"]["get"]["responses"]["200"]
    assert events["content"]["text/event-stream"]["schema"]["$ref"].endswith("/EventMessage")
    message = schemas["EventMessage"]
    assert set(message["properties"]["event"]["enum"]) == EVENT_TYPES | {"gap"}
    assert message["properties"]["data"]["contentMediaType"] == "application/json"
    assert set(schemas["Gap"]["properties"]) == {"requested", "earliest_available", "progress"}
    progress = doc["paths"]["/workflows/{workflow_id}/progress"]["get"]["responses"]["200"]
    assert set(progress["content"]) == {"application/json", "text/event-stream"}
    assert schemas["ProgressMessage"]["properties"]["event"]["enum"] == ["progress"]


def test_publish_body_is_one_event_or_a_batch_of_1_to_1000(doc: dict[str, Any]) -> None:
    post = doc["paths"]["/workflows/{workflow_id}/events"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    single, batch = body["oneOf"]
    assert single == {"$ref": "#/components/schemas/Event"}
    assert (batch["type"], batch["minItems"], batch["maxItems"]) == ("array", 1, 1000)
    assert batch["items"] == single
    assert set(post["responses"]) == {"201", "400", "401", "413", "415", "422", "503"}


def test_error_responses_are_problem_json(doc: dict[str, Any]) -> None:
    codes: set[str] = set()
    for ops in doc["paths"].values():
        for method, op in ops.items():
            if method == "parameters":
                continue
            for code, response in op["responses"].items():
                if int(code) >= 400:
                    codes.add(code)
                    (media,) = response["content"]
                    assert media == "application/problem+json"
                    assert response["content"][media]["schema"]["$ref"].endswith("/Problem")
    assert codes == {"400", "401", "403", "404", "413", "415", "422", "426", "503"}
    stream = doc["paths"]["/workflows/{workflow_id}/events"]["get"]["responses"]
    assert "Retry-After" in stream["503"]["headers"]
    assert "WWW-Authenticate" in stream["401"]["headers"]


def test_every_ref_resolves(doc: dict[str, Any]) -> None:
    refs = re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc))
    assert refs
    assert set(refs) <= set(doc["components"]["schemas"])


SPEC_PROGRESS_KEYS = {
    "workflow_id",
    "state",
    "total_nodes",
    "completed_nodes",
    "failed_nodes",
    "skipped_nodes",
    "running_nodes",
    "percentage",
    "time_percentage",
    "current_node",
    "running",
    "started_at",
    "updated_at",
    "elapsed_seconds",
    "estimated_remaining_seconds",
    "estimated_completion_at",
    "last_event_id",
}
# The SPEC's summary of GET /workflows, as the SPEC lists it.
SPEC_SUMMARY_KEYS = {
    "workflow_id",
    "definition_id",
    "state",
    "total_nodes",
    "completed_nodes",
    "failed_nodes",
    "percentage",
    "estimated_remaining_seconds",
    "started_at",
    "updated_at",
    "watchers",
}


def test_wire_definitions_have_the_spec_keys() -> None:
    # Written out from the SPEC, not derived from the code: a renamed key fails here, and
    # the other tests (which read their key sets from server.wire) follow these definitions.
    assert wire.keys(wire.Progress) == SPEC_PROGRESS_KEYS | {"total_known"}
    assert wire.keys(wire.RunSummary) == SPEC_SUMMARY_KEYS
    assert wire.keys(wire.Gap) == {"requested", "earliest_available", "progress"}
    assert wire.keys(wire.Accepted) == {"ids"}
    assert wire.keys(wire.RunList) == {"workflows", "next"}
    assert wire.keys(wire.HistoryPage) == {"events", "next", "earliest_available"}
    assert wire.keys(wire.Problem) == {"type", "title", "status", "detail"}  # `errors`: 422


def test_progress_schema_has_every_spec_key_required(doc: dict[str, Any]) -> None:
    progress = doc["components"]["schemas"]["Progress"]
    assert set(progress["properties"]) == SPEC_PROGRESS_KEYS | {"total_known"}
    assert set(progress["required"]) == set(progress["properties"])
    assert progress["additionalProperties"] is False
    nullable = {
        k for k, v in progress["properties"].items() if {"type": "null"} in v.get("anyOf", [])
    }
    assert {
        "time_percentage",
        "current_node",
        "estimated_remaining_seconds",
        "estimated_completion_at",
        "started_at",
        "elapsed_seconds",
    } <= nullable
    assert not {"workflow_id", "total_nodes", "percentage", "running", "total_known"} & nullable


async def test_openapi_handler_serves_the_document(aiohttp_client: ClientFactory) -> None:
    app = web.Application()
    app.router.add_get("/openapi.json", openapi_handler)
    client = await aiohttp_client(app)
    resp = await client.get("/openapi.json")
    assert resp.status == 200 and resp.content_type == "application/json"
    assert await resp.json() == openapi_document()


# The models against what the server really answers ---------------------------------------


@pytest.fixture
async def server(
    aiohttp_client: ClientFactory,
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    redis = fakeredis.FakeAsyncRedis()
    yield await aiohttp_client(create_app(Settings(history_prefix=HISTORY_PREFIX), redis=redis))
    await redis.aclose()


async def test_real_problem_answers_match_the_schema(
    server: TestClient[web.Request, web.Application],
) -> None:
    resp = await server.post("/workflows/wf-oa/events", json=[{"event_type": "node_started"}])
    assert resp.status == 422 and resp.content_type == "application/problem+json"
    body = await resp.json()
    wire.adapter(wire.Problem).validate_python(body)
    assert body["errors"] and set(body) == wire.keys(wire.Problem) | {"errors"}


async def test_real_publish_and_progress_answers_match_the_schemas(
    server: TestClient[web.Request, web.Application],
) -> None:
    async def publish(events: list[dict[str, Any]]) -> None:
        resp = await server.post("/workflows/wf-oa/events", json=events)
        assert resp.status == 201, await resp.text()
        wire.adapter(wire.Accepted).validate_python(await resp.json())

    async def progress() -> dict[str, Any]:
        resp = await server.get("/workflows/wf-oa/progress")
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        wire.adapter(wire.Progress).validate_python(body)
        return body

    await publish([{"event_type": "node_started", "node_id": "a", "node_name": "이상 탐지"}])
    unplanned = await progress()
    assert unplanned["total_known"] is False and unplanned["state"] is None
    await publish(
        [
            {
                "event_type": "workflow_planned",
                "nodes": [{"node_id": "a"}, {"node_id": "b", "depends_on": ["a"]}],
            },
            {"event_type": "workflow_state_changed", "to_state": "RUNNING"},
            {"event_type": "node_completed", "node_id": "a", "duration_ms": 1200},
            {"event_type": "node_started", "node_id": "b"},
        ]
    )
    running = await progress()
    assert running["total_known"] is True and running["running"][0]["node_id"] == "b"
    await publish(
        [
            {"event_type": "node_completed", "node_id": "b"},
            {"event_type": "workflow_state_changed", "to_state": "COMPLETED"},
        ]
    )
    done = await progress()
    assert done["percentage"] == 100 and done["estimated_remaining_seconds"] == 0


@pytest.mark.parametrize(
    "value",
    [
        "0-0",
        "1769077817000-3",
        "00000000000000000001-0",
        "18446744073709551615-0",
        "18446744073709551616-0",
        "99999999999999999999-1",
        "1-18446744073709551616",
        "1-0-0",
    ],
)
def test_start_id_schema_accepts_exactly_what_the_server_accepts(value: str) -> None:
    pattern = re.compile(
        openapi_document()["paths"]["/workflows/{workflow_id}/events"]["get"]["parameters"][1][
            "schema"
        ]["pattern"]
    )
    assert bool(pattern.match(value)) == (models.parse_event_id(value) is not None)
