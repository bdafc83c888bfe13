"""Hostile input, generated: SSE framing never breaks, events validate or are rejected cleanly."""

from __future__ import annotations

import json
import re
import string
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from server import sse
from server.models import (
    MAX_NODES,
    EventRejected,
    is_workflow_id,
    to_json,
    validate_event,
)
from testing.sse import Parser

# On a failure Hypothesis imports libcst (to print a patch), which warns on import; under
# `filterwarnings = error` that would abort the whole session instead of reporting the failure.
pytestmark = pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
)

# Bounded so the whole file runs in seconds; `--hypothesis-show-statistics` prints the counts.
PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WF = "wf-props"
NOW = datetime(2026, 1, 22, 10, 28, tzinfo=UTC)
MAX_EVENT_BYTES = 64 * 1024

# Every line terminator some spec or library knows, plus NUL; only CR, LF and CRLF are SSE's.
BREAKS = ["\n", "\r", "\r\n", "\n\r", "\r\r\n", "\x00", "\u2028", "\u2029", "\x85", "\x0b", "\x0c"]
# Any Unicode scalar value (no lone surrogates: they cannot be written as UTF-8 at all).
unicode_text = st.text(st.characters(codec="utf-8"), max_size=60)
hostile_text = st.lists(st.one_of(unicode_text, st.sampled_from(BREAKS)), max_size=12).map("".join)


def _normalised(data: str) -> str:
    return data.replace("\r\n", "\n").replace("\r", "\n")


def _field(value: str) -> str:
    return re.sub(r"[\r\n\x00]", "", value)


# SSE framing ------------------------------------------------------------------------------


@PROPERTY
@given(
    data=hostile_text,
    id=st.none() | hostile_text,
    event=st.none() | hostile_text,
    cut=st.integers(min_value=0),
)
@example(data="a\r\nb\rc\nd", id="1\r\n-0\x00", event="node\rstarted", cut=3)
@example(data="\r", id="", event="\n", cut=0)
@example(data="data: x\n\nid: 9-9\n\nevent: evil", id=None, event=None, cut=7)
def test_any_text_in_data_id_and_event_makes_exactly_one_message(
    data: str, id: str | None, event: str | None, cut: int
) -> None:
    frame = sse.encode(data, id=id, event=event)
    assert frame.endswith(b"\n\n") and b"\r" not in frame
    assert b"\n\n" not in frame[:-2]  # no blank line inside: nothing dispatches early
    (msg,) = Parser().feed(frame)
    assert msg.data == _normalised(data)
    assert msg.id == (None if id is None else _field(id))
    assert msg.event == (_field(event) if event is not None and _field(event) else "message")
    for value in (msg.id or "", msg.event):
        assert not {"\r", "\n", "\x00"} & set(value)
    # Split anywhere, as TCP may: the same one message; two frames in a row: two messages.
    at = cut % (len(frame) + 1)
    parser = Parser()
    assert parser.feed(frame[:at]) + parser.feed(frame[at:]) == [msg]
    assert Parser().feed(frame + frame) == [msg, msg]


@PROPERTY
@given(text=hostile_text)
def test_a_comment_stays_one_line_and_dispatches_nothing(text: str) -> None:
    frame = sse.comment(text)
    assert frame.startswith(b":") and frame.endswith(b"\n\n")
    assert b"\n" not in frame[:-2] and b"\r" not in frame
    messages = Parser().feed(frame + sse.encode("after"))
    assert [m.comment is not None for m in messages] == [True, False]
    assert messages[1].data == "after"


# Workflow ids -----------------------------------------------------------------------------

_ALNUM = set(string.ascii_letters + string.digits)
_ID_CHARS = _ALNUM | set("._-")


def _spec_workflow_id(value: str) -> bool:
    """The SPEC, read literally: 1 to 128 of A-Z a-z 0-9 . _ - starting with a letter or digit."""
    return 1 <= len(value) <= 128 and value[0] in _ALNUM and set(value) <= _ID_CHARS


# Look-alikes a regex with \w, \d, IGNORECASE or `$` would let through.
NEAR_MISSES = [*":*{} /\n\r\t\x00é\u0663\uff11\uff21\u212a\u0130ß", "\U0001f600"]
id_text = st.text(
    st.one_of(st.sampled_from(sorted(_ID_CHARS)), st.sampled_from(NEAR_MISSES)),
    max_size=140,
)


@PROPERTY
@given(
    value=st.one_of(
        id_text,
        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", fullmatch=True),
        st.text(max_size=130),
        st.integers(120, 135).map(lambda n: "a" * n),
    )
)
@example("a\n")
@example("a" * 128)
@example("a" * 129)
@example("")
@example("-a")
@example(".")
@example("\u212a")  # KELVIN SIGN: matches [k] under re.IGNORECASE | re.UNICODE
@example("٣")  # ARABIC-INDIC DIGIT THREE: matches \d
def test_is_workflow_id_accepts_exactly_the_spec_pattern(value: str) -> None:
    assert is_workflow_id(value) == _spec_workflow_id(value)


# Events -----------------------------------------------------------------------------------

EVENT_TYPES = [
    "workflow_planned",
    "workflow_state_changed",
    "node_started",
    "node_progress",
    "node_completed",
    "node_failed",
    "node_skipped",
]
STATES = ["CREATED", "PENDING", "RUNNING", "PAUSED", "COMPLETED", "FAILED", "CANCELLED"]


def json_values(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """Anything `json.loads` can return."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=10**300, max_value=10**400),
        st.floats(allow_nan=False, allow_infinity=False),
        text,
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
        max_leaves=12,
    )


def _offset(minutes: int) -> str:
    if minutes == 0:
        return "Z"
    sign = "+" if minutes > 0 else "-"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


rfc3339 = st.builds(
    lambda dt, frac, offset, sep: dt.isoformat(sep, timespec="seconds") + frac + offset,
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)),
    st.sampled_from(["", ".5", ".123456", ".123456789"]),
    st.one_of(st.integers(-23 * 60 - 59, 23 * 60 + 59).map(_offset), st.sampled_from(["z", "Z"])),
    st.sampled_from(["T", "t", " "]),
)


def event_dicts(text: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts near the event schema: a type's own fields, each mostly plausible, sometimes not."""
    anything = json_values(text)

    def field(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        # About one field in ten is off its schema; the rest are plausible.
        return st.sampled_from(range(10)).flatmap(lambda n: anything if n == 5 else plausible)

    node_id = field(st.sampled_from(["a", "b", "c", "d"]) | text.filter(bool))
    name = field(text)
    nodes = st.lists(
        st.fixed_dictionaries(
            {"node_id": node_id},
            optional={
                "node_name": name,
                "node_type": name,
                "depends_on": field(st.lists(st.sampled_from(["a", "b", "c", "d", "z"]))),
            },
        ),
        max_size=6,
    )
    duration = field(st.integers(0, 10**7) | st.integers(-5, 10**400))
    common = {
        "workflow_id": field(st.sampled_from([WF, "other-wf", "bad id"])),
        "timestamp": field(rfc3339),
        "idempotency_key": field(text.filter(bool)),
    }
    # event_type -> (required fields, optional fields)
    shapes: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        "workflow_planned": (
            {"nodes": field(nodes)},
            {"definition_id": name, "max_concurrency": field(st.integers(-2, 10**400))},
        ),
        "workflow_state_changed": (
            {"to_state": field(st.sampled_from(STATES))},
            {"from_state": field(st.sampled_from(STATES)), "reason": name},
        ),
        "node_started": ({"node_id": node_id}, {"node_name": name, "node_type": name}),
        "node_progress": (
            {"node_id": node_id, "fraction": field(st.floats(-0.5, 1.5))},
            {"message": name},
        ),
        "node_completed": (
            {"node_id": node_id},
            {
                "node_name": name,
                "node_type": name,
                "duration_ms": duration,
                "output": field(st.dictionaries(text, anything, max_size=4)),
            },
        ),
        "node_failed": (
            {"node_id": node_id, "error": field(text)},
            {"node_name": name, "node_type": name, "duration_ms": duration},
        ),
        "node_skipped": ({"node_id": node_id}, {"reason": name}),
    }
    typed = st.sampled_from(EVENT_TYPES).flatmap(
        lambda t: st.fixed_dictionaries(
            {"event_type": st.just(t), **shapes[t][0]}, optional={**common, **shapes[t][1]}
        )
    )
    # Off the schema: a stray field, a missing one, another type's fields, any event_type.
    stray = st.tuples(typed, text, anything).map(lambda p: {**p[0], p[1]: p[2]})
    missing = st.tuples(typed, st.sampled_from(["event_type", "node_id", "nodes", "to_state"]))
    dropped = missing.map(lambda p: {k: v for k, v in p[0].items() if k != p[1]})
    retyped = st.tuples(typed, field(st.sampled_from(EVENT_TYPES)) | text).map(
        lambda p: {**p[0], "event_type": p[1]}
    )
    return st.one_of(typed, typed, typed, stray, dropped, retyped)


def _validate(raw: Any, size_known: bool) -> Any:
    # Over HTTP a single event's size is the body's; in-process and in a batch it is measured.
    size = (
        len(json.dumps(raw, ensure_ascii=False).encode("utf-8", "replace")) if size_known else None
    )
    return validate_event(raw, WF, max_event_bytes=MAX_EVENT_BYTES, now=NOW, size=size)


def _check_valid_or_rejected(raw: Any, size_known: bool) -> None:
    try:
        valid = _validate(raw, size_known)
    except EventRejected as exc:
        assert exc.errors and all(set(e) == {"loc", "msg"} for e in exc.errors), exc.errors
        event("rejected")
        return
    event("valid " + raw["event_type"])
    stored = to_json(valid)
    assert "\n" not in stored and "\r" not in stored  # one `data:` line
    parsed = json.loads(stored)
    assert parsed["workflow_id"] == WF and parsed["event_type"] == raw["event_type"]
    assert parsed["timestamp"].endswith("Z")
    assert None not in parsed.values()
    again = validate_event(parsed, WF, max_event_bytes=MAX_EVENT_BYTES, now=NOW)
    assert to_json(again) == stored  # the stored form is a fixed point of validation


@PROPERTY
@given(
    raw=st.one_of(event_dicts(unicode_text), json_values(unicode_text)), size_known=st.booleans()
)
@example(raw={"event_type": "node_started", "node_id": "품질 판정"}, size_known=False)
@example(raw={"event_type": "node_started", "node_id": "n", "extra": 1}, size_known=True)
@example(
    raw={"event_type": "workflow_planned", "nodes": [{"node_id": "a", "depends_on": ["a"]}]},
    size_known=True,
)
@example(
    raw={"event_type": "node_completed", "node_id": "a", "duration_ms": 10**400}, size_known=True
)
def test_any_json_either_validates_to_a_stable_line_or_is_rejected(
    raw: Any, size_known: bool
) -> None:
    _check_valid_or_rejected(raw, size_known)


# A `\ud800` escape in a JSON body decodes to a lone surrogate, which UTF-8 cannot carry.
surrogate_text = st.lists(
    st.one_of(
        st.text(st.characters(codec="utf-8"), max_size=5),
        st.characters(categories=["Cs"]),
    ),
    min_size=1,
    max_size=4,
).map("".join)


@PROPERTY
@given(raw=event_dicts(surrogate_text), size_known=st.booleans())
@example(raw={"event_type": "node_started", "node_id": "\ud800"}, size_known=False)
@example(
    raw={"event_type": "node_completed", "node_id": "a", "output": {"k": "\udfff"}}, size_known=True
)
@example(
    raw={"event_type": "node_completed", "node_id": "a", "output": {"\ud800": 1}}, size_known=True
)
def test_lone_surrogates_are_rejected_or_stored_as_utf8_never_a_crash(
    raw: dict[str, Any], size_known: bool
) -> None:
    _check_valid_or_rejected(raw, size_known)
    try:
        valid = _validate(raw, size_known)
    except EventRejected:
        return
    to_json(valid).encode("utf-8")  # what the store writes: it must be encodable


@PROPERTY
@given(
    offset=st.integers(-23 * 60 - 59, 23 * 60 + 59),
    end=st.sampled_from(["0001-01-01T00:00:00", "9999-12-31T23:59:59"]),
)
def test_timestamps_at_the_edges_of_the_calendar_never_crash_storage(offset: int, end: str) -> None:
    _check_valid_or_rejected(
        {"event_type": "node_started", "node_id": "a", "timestamp": end + _offset(offset)}, True
    )


@settings(max_examples=30, deadline=None)
@given(n=st.one_of(st.integers(1, 50), st.integers(MAX_NODES - 2, MAX_NODES + 2)))
def test_plans_up_to_the_node_limit_validate_and_larger_ones_are_rejected(n: int) -> None:
    nodes = [{"node_id": f"n{i}", "depends_on": [f"n{i - 1}"] if i else []} for i in range(n)]
    raw = {"event_type": "workflow_planned", "nodes": nodes}
    if n > MAX_NODES:
        try:
            _validate(raw, False)
        except EventRejected:
            return
        raise AssertionError(f"a plan of {n} nodes was accepted")
    assert json.loads(to_json(_validate(raw, False)))["nodes"][-1]["node_id"] == f"n{n - 1}"
