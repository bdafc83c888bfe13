"""The publish path's validation shortcuts give the same answers as the long way."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from server.models import EventRejected, decode_body, to_json, validate_event

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
        "event_type": "node_started", "node_id": "n", "workflow_id": "wf",
        "timestamp": "2026-01-22T10:00:00Z",
    }  # fmt: skip
    again = validate_event(
        {**raw, "workflow_id": "wf", "timestamp": "2026-01-22T19:00:00+09:00"},
        "wf", max_event_bytes=1000, now=datetime(2000, 1, 1, tzinfo=UTC),
    )  # fmt: skip
    assert to_json(again) == to_json(event)


def test_a_known_size_still_limits_and_the_workflow_id_must_match() -> None:
    raw = {"event_type": "node_failed", "node_id": "n", "error": "x"}
    with pytest.raises(EventRejected, match="MAX_EVENT_BYTES"):
        validate_event(raw, "wf", max_event_bytes=100, now=NOW, size=101, text_checked=True)
    with pytest.raises(EventRejected, match="does not match") as info:
        validate_event({**raw, "workflow_id": "other"}, "wf", max_event_bytes=100, now=NOW)
    assert info.value.errors == [{"loc": ["workflow_id"], "msg": "must be 'wf' or absent"}]
