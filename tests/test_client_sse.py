"""The client's event-stream parser, rule by rule of the WHATWG format, on exact bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.client.sse import EventStreamParser, ServerSentEvent


def parse(raw: bytes, last_event_id: str = "") -> list[tuple[str, str, str]]:
    parser = EventStreamParser(last_event_id)
    return [(m.event, m.data, m.id) for m in parser.feed(raw)]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"data: a\n\n", [("message", "a", "")]),
        (b"data: a\r\n\r\n", [("message", "a", "")]),
        (b"data: a\r\r", [("message", "a", "")]),
        (b"data: a\r\ndata: b\rdata: c\n\n", [("message", "a\nb\nc", "")]),
        (b"data: a\ndata: b\n\n", [("message", "a\nb", "")]),
        (b"data:a\n\n", [("message", "a", "")]),  # the space after the colon is optional
        (b"data:  a\n\n", [("message", " a", "")]),  # only one space is removed
        (b"data\n\n", [("message", "", "")]),  # no colon: the whole line is the field name
        (b"data:\ndata:\n\n", [("message", "\n", "")]),
        (b"event: node_started\ndata: {}\n\n", [("node_started", "{}", "")]),
        (b"event: x\n\ndata: a\n\n", [("message", "a", "")]),  # the type resets on dispatch
        (b"id: 1-0\ndata: a\n\ndata: b\n\n", [("message", "a", "1-0"), ("message", "b", "1-0")]),
        (b"id: 1-0\n\ndata: b\n\n", [("message", "b", "1-0")]),  # an id alone still counts
        (b"id: 1-0\ndata: a\n\nid\ndata: b\n\n", [("message", "a", "1-0"), ("message", "b", "")]),
        (
            b"id: 1-0\ndata: a\n\nid: 2\x00\ndata: b\n\n",
            [("message", "a", "1-0"), ("message", "b", "1-0")],
        ),
        (b": keep-alive\n\n", []),
        (b":\ndata: a\n: between\n\n", [("message", "a", "")]),
        (b"\xef\xbb\xbfdata: a\n\n", [("message", "a", "")]),  # a BOM at the start is dropped
        (b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n", []),  # only one: "\ufeffdata" is another field
        (b"data: a\n\n\xef\xbb\xbfdata: b\n\n", [("message", "a", "")]),  # not in the middle
        (b"data: a", []),  # not dispatched without its blank line
        (b"data: a\n", []),
        (b"foo: bar\ndata: a\n\n", [("message", "a", "")]),  # unknown fields are ignored
        (b"data: \xed\x95\x9c\xea\xb8\x80\n\n", [("message", "한글", "")]),
        (b"data: \xff\n\n", [("message", "\ufffd", "")]),  # invalid UTF-8 is replaced
        (b"\n\n\n", []),
    ],
)
def test_messages_follow_the_event_stream_rules(
    raw: bytes, expected: list[tuple[str, str, str]]
) -> None:
    assert parse(raw) == expected


@pytest.mark.parametrize(
    ("raw", "retry"),
    [
        (b"retry: 1500\n\n", 1500),
        (b"retry:250\n\n", 250),
        (b"retry: 1500\nretry: 12a\n\n", 1500),  # non-digits: ignored, the old value stays
        (b"retry: -1\n\n", None),
        (b"retry: 1.5\n\n", None),
        (b"retry: \xc2\xb2\n\n", None),  # a Unicode digit that is not ASCII
        (b"retry:\n\n", None),
        (b"retry: 100 \n\n", None),
    ],
)
def test_retry_takes_ascii_digits_only(raw: bytes, retry: int | None) -> None:
    parser = EventStreamParser()
    assert parser.feed(raw) == []
    assert parser.retry == retry


def test_last_event_id_carries_over_from_a_previous_connection() -> None:
    assert parse(b"data: a\n\n", last_event_id="7-0") == [("message", "a", "7-0")]


def test_a_crlf_split_between_chunks_is_one_line_end() -> None:
    parser = EventStreamParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\r") == [ServerSentEvent("message", "a", "")]
    assert parser.feed(b"\ndata: b\n\n") == [ServerSentEvent("message", "b", "")]


def test_a_cr_only_stream_dispatches_without_waiting_for_the_next_chunk() -> None:
    parser = EventStreamParser()
    assert parser.feed(b"data: a\r\r") == [ServerSentEvent("message", "a", "")]


def test_a_bom_split_across_chunks_is_still_dropped() -> None:
    parser = EventStreamParser()
    assert parser.feed(b"\xef") == []
    assert parser.feed(b"\xbb") == []
    assert parser.feed(b"\xbfdata: a\n\n") == [ServerSentEvent("message", "a", "")]


FIELD_LINES = st.sampled_from(
    [
        b"data: x",
        b"data:",
        b"data: \xed\x95\x9c",
        b"event: e",
        b"id: 3-1",
        b"id",
        b": c",
        b"retry: 10",
        b"retry: x",
        b"",
        b"",
        b"other: y",
    ]
)
LINE_ENDS = st.sampled_from([b"\n", b"\r", b"\r\n"])


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.tuples(FIELD_LINES, LINE_ENDS), max_size=30))
    bom = draw(st.sampled_from([b"", b"\xef\xbb\xbf"]))
    return bom + b"".join(line + end for line, end in lines)


@given(streams(), st.lists(st.integers(min_value=0, max_value=200), max_size=20))
def test_chunk_boundaries_anywhere_give_the_same_messages(raw: bytes, cuts: list[int]) -> None:
    whole = EventStreamParser()
    expected = whole.feed(raw)
    split = EventStreamParser()
    got: list[ServerSentEvent] = []
    bounds = sorted({min(c, len(raw)) for c in cuts})
    for start, end in zip([0, *bounds], [*bounds, len(raw)], strict=True):
        got.extend(split.feed(raw[start:end]))
    assert got == expected
    assert (split.retry, split.last_event_id) == (whole.retry, whole.last_event_id)
