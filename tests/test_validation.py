"""The publish path's validation shortcuts give the same answers as the long way."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from server.models import (
    PIECES_BYTES,
    EventRejected,
    decode_body,
    event_adapter,
    to_json,
    validate_event,
)

NOW = datetime(2026, 1, 22, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": "\\ud800"}',
        b'{"a": "x\\uDFFFy"}',
        b'{"\\udbff": 1}',
        b"\xff",
        b"{",
    ],
)
def test_decode_body_rejects_what_is_not_storable_json(body: bytes) -> None:
    with pytest.raises(ValueError):  # UnicodeError is a ValueError
        decode_body(body)


@pytest.mark.parametrize(
    ("body", "value"),
    [
        (b'{"a": "\\ud83d\\ude00"}', {"a": "\U0001f600"}),  # a surrogate pair is one character
        (b'{"a": "\\\\ud800"}', {"a": "\\ud800"}),  # an escaped backslash: plain text
        ('{"a": "품질 판정"}'.encode(), {"a": "품질 판정"}),
        (b"[1, 2]", [1, 2]),
    ],
)
def test_decode_body_accepts_unicode_text(body: bytes, value: Any) -> None:
    assert decode_body(body) == value


def test_filled_fields_are_the_same_as_before_and_the_input_is_left_alone() -> None:
    raw = {"event_type": "node_started", "node_id": "n", "timestamp": None}
    body = json.dumps(raw).encode()
    event = validate_event(
        decode_body(body), "wf", max_event_bytes=1000, now=NOW, size=len(body), text_checked=True
    )
    assert raw == {"event_type": "node_started", "node_id": "n", "timestamp": None}
    assert json.loads(to_json(event)) == {
        "event_type": "node_started",
        "node_id": "n",
        "workflow_id": "wf",
        "timestamp": "2026-01-22T10:00:00Z",
    }
    again = validate_event(
        {**raw, "workflow_id": "wf", "timestamp": "2026-01-22T19:00:00+09:00"},
        "wf",
        max_event_bytes=1000,
        now=datetime(2000, 1, 1, tzinfo=UTC),
    )
    assert to_json(again) == to_json(event)


def test_a_known_size_still_limits_and_the_workflow_id_must_match() -> None:
    raw = {"event_type": "node_failed", "node_id": "n", "error": "x"}
    with pytest.raises(EventRejected, match="MAX_EVENT_BYTES"):
        validate_event(raw, "wf", max_event_bytes=100, now=NOW, size=101, text_checked=True)
    with pytest.raises(EventRejected, match="does not match") as info:
        validate_event({**raw, "workflow_id": "other"}, "wf", max_event_bytes=100, now=NOW)
    assert info.value.errors == [{"loc": ["workflow_id"], "msg": "must be 'wf' or absent"}]


# Bodies over models.PIECES_BYTES are decoded and plans over models.PIECE_NODES validated
# and serialised in pieces (so a worker thread lets the event loop run): the same answers.

TEXTS = ["품질 판정", 'a "quote", a \\ and \\n', "tab\tnew\nline\x01", "\U0001f600", '"nodes":[]']


def big_plan(nodes: int = 3_000, **fields: Any) -> dict[str, Any]:
    plan = [
        {
            "node_id": f"n{i}",
            "node_name": TEXTS[i % 5] + "x" * 80,
            "node_type": TEXTS[i % 3],
            "depends_on": [f"n{j}" for j in range(max(0, i - 3), i)],
        }
        for i in range(nodes)
    ]
    return {"event_type": "workflow_planned", "nodes": plan, **fields}


def one_call_errors(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """What event_adapter.validate_python() says of `raw` in one call (the fields
    validate_event fills in filled in the same way)."""
    try:
        event_adapter.validate_python({"workflow_id": "wf", "timestamp": NOW, **raw})
    except ValidationError as exc:
        return [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
    raise AssertionError("expected errors")


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


@pytest.mark.parametrize(
    "value",
    [
        big_plan(definition_id="d", max_concurrency=3),
        [big_plan(), {"event_type": "node_progress", "node_id": "n1", "fraction": 0.25}],
        [
            {
                "event_type": "node_completed",
                "node_id": f"n{i}",
                "duration_ms": 10**20,
                "output": {"x": [1.5, -0.0, 1e300, None, True, {"y": "품질"}]},
            }
            for i in range(3_000)
        ],
    ],
    ids=["plan", "batch with a plan", "batch of 3,000 events"],
)
def test_a_big_body_decodes_in_pieces_to_the_same_value(value: Any) -> None:
    spaced = json.dumps(value, ensure_ascii=False, separators=(" ,\t", " :\r\n "))
    body = b" \n" + spaced.encode() + b" \r\n"
    assert len(body) > PIECES_BYTES
    decoded = decode_body(body)
    assert decoded == json.loads(body)
    assert dumps(decoded) == dumps(json.loads(body))  # the same types and key order too


PLAN = dumps(big_plan())


@pytest.mark.parametrize(
    "body",
    [
        PLAN + b" x",
        PLAN.replace(b'"node_type":', b'"node_type"', 1),
        PLAN[:-1] + b",}",
        PLAN.replace(b'"n1"]', b'"n1",]', 1),
        PLAN.replace(b'"n7"', b'"n7\x01"', 1),
        b"[" + PLAN + b"," + PLAN + b" 1]",
    ],
    ids=[
        "extra data",
        "no colon",
        "trailing comma",
        "trailing comma in a node",
        "control character",
        "batch",
    ],
)
def test_a_big_malformed_body_gets_the_message_of_the_one_call_decoder(body: bytes) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(body)
    with pytest.raises(json.JSONDecodeError) as info:
        decode_body(body)
    assert str(info.value) == str(expected.value)  # where, too: "line 1 column ..."


def test_nan_deep_in_a_big_body_is_not_json() -> None:
    with pytest.raises(ValueError, match="NaN is not JSON"):
        decode_body(PLAN.replace(b'"n7"]', b'"n7"], "x": [NaN]', 1))


def test_a_number_beyond_float_range_deep_in_a_big_batch_is_located() -> None:
    body = dumps([big_plan(), big_plan()]).replace(b'"n2998"]}]', b'"n2998"], "x": 1e999}]', 1)
    with pytest.raises(EventRejected) as info:
        decode_body(body)
    assert info.value.errors[0]["loc"] == [0, "nodes", 2999, "x"]


def test_a_big_plan_validates_in_pieces_to_the_same_event_and_stored_json() -> None:
    raw = big_plan(definition_id='"nodes":[]', idempotency_key="k")
    event = validate_event(raw, "wf", max_event_bytes=100, now=NOW)
    assert event == event_adapter.validate_python({**raw, "workflow_id": "wf", "timestamp": NOW})
    assert to_json(event) == event.model_dump_json(exclude_none=True)


def _node(i: int, **fields: Any) -> dict[str, Any]:
    return {"node_id": f"n{i}", **fields}


@pytest.mark.parametrize(
    ("envelope", "nodes"),
    [
        ({}, {5: _node(5, depends_on=["nowhere"])}),  # the DAG check, after the nodes
        ({}, {7: _node(8)}),  # duplicate ids
        ({}, {2: _node(2, depends_on=["n2999"]), 2999: _node(2999, depends_on=["n2"])}),
        (
            {"workflow_id": "a b", "zzz": 1, "max_concurrency": "3", "definition_id": 4},
            {1500: "x", 5: _node(5, node_id=""), 2999: _node(2999, bad=1, node_name=3)},
        ),
        ({"timestamp": "yesterday"}, {0: None, 1: ["a"], 2: _node(2, node_id="x" * 300)}),
        ({"max_concurrency": 0}, {}),
        ({}, {i: _node(i, node_type=i) for i in range(0, 3_000, 7)}),
    ],
    ids=[
        "unplanned dependency",
        "duplicate",
        "cycle",
        "envelope and nodes",
        "types",
        "envelope only",
        "every 7th node",
    ],
)
def test_a_big_invalid_plan_gets_the_errors_of_one_call_in_the_same_order(
    envelope: dict[str, Any], nodes: dict[int, Any]
) -> None:
    raw = big_plan(**envelope)
    for index, node in nodes.items():
        raw["nodes"][index] = node
    with pytest.raises(EventRejected) as info:
        validate_event(raw, "wf", max_event_bytes=100, now=NOW)
    assert info.value.errors == one_call_errors(raw)
