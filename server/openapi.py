"""The OpenAPI 3.1 document of the HTTP API, generated from the event models
(server.models) and the answers' definitions (server.wire).

~510 lines: the schemas are generated, but each route's parameters, headers, status codes
and their descriptions are written here, once (they are the document's own text)."""

from __future__ import annotations

import json
from functools import cache
from typing import Any, get_args

from aiohttp import web

from server import wire
from server.models import MAX_BATCH, State, event_adapter
from server.overview.runs import PAGE_DEFAULT as RUNS_PAGE_DEFAULT
from server.overview.runs import PAGE_MAX as RUNS_PAGE_MAX
from server.views import PAGE_DEFAULT, PAGE_MAX
from server.wire import EVENT_ID_PATTERN, WORKFLOW_ID_PATTERN

REF = "#/components/schemas/{model}"
PROBLEM = "application/problem+json"
SSE = "text/event-stream"


_REASONS = {
    400: "Malformed JSON, a bad workflow id or a bad Last-Event-ID.",
    401: "Missing or invalid credentials.",
    403: "Valid credentials for another workflow (or definition).",
    404: "Unknown workflow (no events, or expired), or a definition with no history.",
    413: "Body over MAX_BODY_BYTES.",
    415: "Content-Type is not application/json.",
    422: "Valid JSON that is not an event or a batch of 1 to 1,000 events.",
    426: "A WebSocket endpoint asked without a WebSocket upgrade.",
    503: "Redis is unavailable, or MAX_STREAMS streams are open.",
}

_RETRY_AFTER = {"description": "Seconds to wait.", "schema": {"type": "integer"}}
_CHALLENGE = {"description": "The Bearer challenge.", "schema": {"type": "string"}}


def _problem(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _REASONS[status],
        "content": {PROBLEM: {"schema": {"$ref": REF.format(model="Problem")}}},
    }
    if status == 503:
        response["headers"] = {"Retry-After": _RETRY_AFTER}
    if status == 401:
        response["headers"] = {"WWW-Authenticate": _CHALLENGE}
    return response


def _problems(*statuses: int) -> dict[str, Any]:
    return {str(s): _problem(s) for s in statuses}


def _text(description: str, media: str = "text/plain") -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_STATUS = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"type": "string"}},
}

_WORKFLOW_ID = {
    "name": "workflow_id",
    "in": "path",
    "required": True,
    "description": "1 to 128 of A-Z a-z 0-9 . _ -, starting with a letter or digit.",
    "schema": {"type": "string", "pattern": WORKFLOW_ID_PATTERN},
}


def _start(schema: dict[str, Any], usage: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "Last-Event-ID",
            "in": "header",
            "required": False,
            "description": f"{usage} (wins over lastEventId; empty counts as absent).",
            "schema": schema,
        },
        {
            "name": "lastEventId",
            "in": "query",
            "required": False,
            "description": f"{usage}, for clients that cannot set headers.",
            "schema": schema,
        },
    ]


def uint64_pattern() -> str:
    """A regex for the decimal numbers 0 .. 2**64 - 1 (leading zeros allowed, 1 to 20
    digits), as the server parses an id's parts: so a schema-valid id is never refused."""
    top = str(2**64 - 1)
    alternatives = ["[0-9]{1,19}", top]
    for i, digit in enumerate(top):
        if digit != "0":
            rest = len(top) - i - 1
            alternatives.append(f"{top[:i]}[0-{int(digit) - 1}][0-9]{{{rest}}}")
    return "(?:" + "|".join(alternatives) + ")"


# Empty counts as absent and surrounding spaces and tabs are ignored (views.start_id_of);
# anything else is a 400.
_UINT64 = uint64_pattern()
_START_ID = {"type": "string", "pattern": rf"^[ \t]*({_UINT64}-{_UINT64})?[ \t]*$"}
_SUBSCRIBE_SECURITY: list[dict[str, list[str]]] = [
    {},  # open unless SUBSCRIBE_SECRET is set
    {"subscribeBearer": []},
    {"subscribeQuery": []},
    {"subscribeCookie": []},
]


def _publish_operation() -> dict[str, Any]:
    event = {"$ref": REF.format(model="Event")}
    return {
        "operationId": "publishEvents",
        "summary": "Store one event or a batch of 1 to 1,000, all or nothing.",
        "security": [{}, {"publishBearer": []}],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "oneOf": [
                            event,
                            {"type": "array", "items": event, "minItems": 1, "maxItems": MAX_BATCH},
                        ]
                    }
                }
            },
        },
        "responses": {
            "201": _json("Stored; ids in input order.", {"$ref": REF.format(model="Accepted")}),
            **_problems(400, 401, 413, 415, 422, 503),
        },
    }


def _stream_operation() -> dict[str, Any]:
    return {
        "operationId": "streamEvents",
        "summary": "Server-Sent Events: retained history after the start id, then live.",
        "description": (
            "Each message is `id: <event id>`, `event: <event_type>`, `data: <Event as JSON>`. "
            "An `event: gap` announces trimmed history; the response ends after a terminal "
            "state."
        ),
        "security": _SUBSCRIBE_SECURITY,
        "parameters": [*_start(_START_ID, "Resume after this id"), *_PAGE_PARAMETERS],
        "responses": {
            "200": {
                "description": (
                    "The event stream (the schema describes one message); with Accept: "
                    "application/json and no text/event-stream, a page of the history."
                ),
                "headers": {"Vary": {"schema": {"type": "string"}}},
                "content": {
                    SSE: {"schema": {"$ref": REF.format(model="EventMessage")}},
                    "application/json": {"schema": {"$ref": REF.format(model="HistoryPage")}},
                },
            },
            "204": {"description": "Already at or past the terminal event: stop reconnecting."},
            **_problems(400, 401, 403, 404, 503),
        },
    }


_PAGE_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "after",
        "in": "query",
        "required": False,
        "description": "JSON page: events after this id (exclusive); absent: the beginning. "
        "Checked in the stream form too.",
        "schema": _START_ID,
    },
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "description": f"JSON page: at most this many events (default {PAGE_DEFAULT}). "
        "Checked in the stream form too.",
        "schema": {"type": "integer", "minimum": 1, "maximum": PAGE_MAX, "default": PAGE_DEFAULT},
    },
]


def _progress_operation() -> dict[str, Any]:
    return {
        "operationId": "getProgress",
        "summary": "Progress and ETA; with Accept: text/event-stream, a stream of them.",
        "security": _SUBSCRIBE_SECURITY,
        "parameters": [
            # Only the stream form reads it (to answer 204 after the final object): not checked.
            *_start({"type": "string"}, "Stream form: the last progress id seen"),
            {
                "name": "If-None-Match",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
            },
        ],
        "responses": {
            "200": {
                "description": "The progress object (ETag: its last_event_id).",
                "headers": {"ETag": {"schema": {"type": "string"}}},
                "content": {
                    "application/json": {"schema": {"$ref": REF.format(model="Progress")}},
                    SSE: {"schema": {"$ref": REF.format(model="ProgressMessage")}},
                },
            },
            "204": {"description": "Stream form: the final object was already seen."},
            "304": {"description": "Unchanged since the ETag given in If-None-Match."},
            **_problems(400, 401, 403, 404, 503),
        },
    }


def _schedule_operation() -> dict[str, Any]:
    return {
        "operationId": "getSchedule",
        "summary": "Each node's real and predicted start and end, from the ETA's own futures.",
        "description": (
            "Read from the simulated futures of the estimate that /progress shows (no second "
            "simulation): per node the weighted median start and end, moved on to `as_of` "
            "and stretched so that the latest end is `estimated_completion_at`."
        ),
        "security": _SUBSCRIBE_SECURITY,
        "responses": {
            "200": _json("The schedule.", {"$ref": REF.format(model="Schedule")}),
            **_problems(400, 401, 403, 404, 503),
        },
    }


_STATE_LIST = "(?:" + "|".join(get_args(State)) + ")"


def _list_operation() -> dict[str, Any]:
    return {
        "operationId": "listWorkflows",
        "summary": "The known runs, most recently updated first; with Accept: "
        "text/event-stream, the live overview.",
        "description": (
            "The stream form sends an `event: run` frame per summary of the first page, then "
            "one per run whose summary changes (state, counts, ETA or watchers), at most 4 a "
            "second per run; a reconnect gets the first page again. With SUBSCRIBE_SECRET "
            "set, only the runs the token may read are listed."
        ),
        "security": _SUBSCRIBE_SECURITY,
        "parameters": [
            {
                "name": "state",
                "in": "query",
                "required": False,
                "description": "One or more states, comma-separated.",
                "schema": {"type": "string", "pattern": f"^{_STATE_LIST}(?:,{_STATE_LIST})*$"},
            },
            {
                "name": "definition_id",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "pattern": WORKFLOW_ID_PATTERN},
            },
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "schema": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": RUNS_PAGE_MAX,
                    "default": RUNS_PAGE_DEFAULT,
                },
            },
            {
                "name": "cursor",
                "in": "query",
                "required": False,
                "description": "`next` of the previous page, as it was given (opaque; any "
                "other value is a 400).",
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"},
            },
        ],
        "responses": {
            "200": {
                "description": "A page of runs, or the overview stream.",
                "content": {
                    "application/json": {"schema": {"$ref": REF.format(model="RunList")}},
                    SSE: {"schema": {"$ref": REF.format(model="RunMessage")}},
                },
            },
            **_problems(400, 401, 503),
        },
    }


def _stats_operation() -> dict[str, Any]:
    return {
        "operationId": "getDefinitionStats",
        "summary": "What the duration history knows of a definition, per node and node type.",
        "description": (
            'With SUBSCRIBE_SECRET set, the token needs `"*"` in `workflows` or the '
            "definition in a `definitions` claim."
        ),
        "security": _SUBSCRIBE_SECURITY,
        "responses": {
            "200": _json("The statistics.", {"$ref": REF.format(model="DefinitionStats")}),
            **_problems(400, 401, 403, 404, 503),
        },
    }


def _message(
    title: str, names: list[str], data: dict[str, Any], description: str
) -> dict[str, Any]:
    """One Server-Sent Events message as the OpenAPI 3.2 convention models it."""
    return {
        "title": title,
        "type": "object",
        "description": description,
        "required": ["data", "event"],
        "properties": {
            "event": {"type": "string", "enum": sorted(names)},
            "id": {"type": "string", "pattern": EVENT_ID_PATTERN},
            "retry": {"type": "integer", "minimum": 0},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": data,
            },
        },
    }


def _add(schemas: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    """Add a component once: the same model met again is skipped, a clash is an error."""
    if name in schemas and schemas[name] != schema:
        raise ValueError(f"two different component schemas are named {name!r}")
    schemas[name] = schema


def _components() -> dict[str, Any]:
    events = event_adapter.json_schema(ref_template=REF, mode="validation")
    schemas: dict[str, Any] = dict(events.pop("$defs"))
    for name, schema in schemas.items():
        if name != "PlannedNode" and "workflow_id" in schema["properties"]:
            # The model checks it in a validator, invisible to the generated schema.
            schema["properties"]["workflow_id"]["anyOf"][0]["pattern"] = WORKFLOW_ID_PATTERN
    schemas["Event"] = {"title": "Event", **events}
    for answer in wire.ANSWERS:
        generated = wire.schema(answer, REF)
        for name, schema in {**generated.pop("$defs", {}), answer.__name__: generated}.items():
            _add(schemas, name, schema)
    schemas["EventMessage"] = _message(
        "EventMessage",
        [*events["discriminator"]["mapping"], "gap"],
        {"oneOf": [{"$ref": REF.format(model="Event")}, {"$ref": REF.format(model="Gap")}]},
        "One SSE message: a stored event (`event:` is its event_type) or a gap notice.",
    )
    schemas["ProgressMessage"] = _message(
        "ProgressMessage",
        ["progress"],
        {"$ref": REF.format(model="Progress")},
        "One `event: progress` message.",
    )
    schemas["RunMessage"] = _message(
        "RunMessage",
        ["run"],
        {"$ref": REF.format(model="RunSummary")},
        "One `event: run` message of the overview.",
    )
    for name, schema in schemas.items():
        if schema.get("title") != name:
            raise ValueError(f"component schema {name!r} is titled {schema.get('title')!r}")
    return {
        "schemas": schemas,
        "securitySchemes": {
            "publishBearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "PUBLISH_TOKEN, when set.",
            },
            "subscribeBearer": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": "HS256 JWT signed with SUBSCRIBE_SECRET.",
            },
            "subscribeQuery": {"type": "apiKey", "in": "query", "name": "access_token"},
            "subscribeCookie": {"type": "apiKey", "in": "cookie", "name": "access_token"},
        },
    }


def _websocket_operation(operation_id: str) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": "WebSocket: each stored event as one text message, with its `id`.",
        "description": (
            "After the upgrade (RFC 6455) each stored event is one text message: the object "
            "the SSE `data:` carries, with `id` first; trimmed history is announced as "
            '`{"event_type": "gap", ...}`. The socket closes 1000 after the terminal state '
            "(at once for a resume at or past it) and 1001 with the reason `retry_ms=<n>` "
            "when the server shuts down."
        ),
        "security": _SUBSCRIBE_SECURITY,
        "parameters": [_start(_START_ID, "Resume after this id")[1]],
        "responses": {
            "101": {"description": "Switching Protocols: the WebSocket."},
            **_problems(400, 401, 403, 426, 503),
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document: paths, event and progress schemas, problem responses."""
    ops_security: list[dict[str, list[str]]] = [{}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Workflow events over SSE",
            "version": "0.1.0",
            "description": "Publish workflow events; stream them and their progress.",
        },
        "paths": {
            "/workflows": {"get": _list_operation()},
            "/workflows/{workflow_id}/events": {
                "parameters": [_WORKFLOW_ID],
                "post": _publish_operation(),
                "get": _stream_operation(),
            },
            "/workflows/{workflow_id}/progress": {
                "parameters": [_WORKFLOW_ID],
                "get": _progress_operation(),
            },
            "/workflows/{workflow_id}/schedule": {
                "parameters": [_WORKFLOW_ID],
                "get": _schedule_operation(),
            },
            "/definitions/{definition_id}/stats": {
                "parameters": [
                    {
                        **_WORKFLOW_ID,
                        "name": "definition_id",
                        "description": "The rules of a workflow id.",
                    }
                ],
                "get": _stats_operation(),
            },
            "/workflows/{workflow_id}/ws": {
                "parameters": [_WORKFLOW_ID],
                "get": _websocket_operation("websocketEvents"),
            },
            "/api/v1/workflows/ws/{instance_id}": {
                "parameters": [{**_WORKFLOW_ID, "name": "instance_id"}],
                "get": _websocket_operation("websocketEventsLegacy"),
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "200 while the process serves.",
                    "security": ops_security,
                    "responses": {"200": _json("Serving.", _STATUS)},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "200 when Redis answers, else 503.",
                    "security": ops_security,
                    "responses": {"200": _json("Ready.", _STATUS), **_problems(503)},
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus text exposition.",
                    "security": ops_security,
                    "responses": {"200": _text("Metrics.")},
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "security": ops_security,
                    "responses": {"200": _json("OpenAPI 3.1.", {"type": "object"})},
                }
            },
        },
        "components": _components(),
    }


@cache
def _document_bytes() -> bytes:
    return json.dumps(openapi_document(), ensure_ascii=False).encode()


async def openapi_handler(request: web.Request) -> web.Response:
    """GET /openapi.json (built once per process)."""
    return web.Response(body=_document_bytes(), content_type="application/json")
