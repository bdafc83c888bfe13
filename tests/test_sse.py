"""SSE framing: one table row per rule of the event-stream format, exact bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server import sse
from testing.sse import Parser


@pytest.mark.parametrize(
    ("kwargs", "wire"),
    [
        ({"data": "x"}, b"data: x\n\n"),
        ({"data": ""}, b"data: \n\n"),
        ({"data": "a\nb"}, b"data: a\ndata: b\n\n"),
        ({"data": "a\rb"}, b"data: a\ndata: b\n\n"),
        ({"data": "a\r\nb"}, b"data: a\ndata: b\n\n"),
        ({"data": "a\n"}, b"data: a\ndata: \n\n"),
        (
            {"data": "x", "id": "1-0", "event": "node_started"},
            b"id: 1-0\nevent: node_started\ndata: x\n\n",
        ),
        ({"data": "x", "id": "1\n-0\r", "event": "a\nb"}, b"id: 1-0\nevent: ab\ndata: x\n\n"),
        ({"data": "x", "id": "1\x00-0"}, b"id: 1-0\ndata: x\n\n"),
        ({"retry": 3000}, b"retry: 3000\n\n"),
        ({"data": "품질 판정"}, "data: 품질 판정\n\n".encode()),
        ({"data": ": not a comment"}, b"data: : not a comment\n\n"),
    ],
)
def test_encode_exact_bytes(kwargs: dict[str, object], wire: bytes) -> None:
    assert sse.encode(**kwargs) == wire  # type: ignore[arg-type]


def test_encode_needs_a_field_and_a_valid_retry() -> None:
    with pytest.raises(ValueError):
        sse.encode()
    with pytest.raises(ValueError):
        sse.encode(retry=-1)


def test_comment_cannot_break_out_of_its_line() -> None:
    assert sse.comment("keep-alive") == b": keep-alive\n\n"
    assert sse.comment("a\nevent: x") == b": a event: x\n\n"
    assert sse.comment() == b":\n\n"


@pytest.mark.parametrize(
    "data", ["a\nb\rc\r\nd", "", "\n", "x\x00y", "\u2028 \u2029 ok", '{"k": 1}']
)
def test_encoded_data_parses_back_to_itself_modulo_line_breaks(data: str) -> None:
    frame = sse.encode(data, id="5-1", event="e")
    (msg,) = Parser().feed(frame)
    assert msg.id == "5-1" and msg.event == "e"
    assert msg.data == data.replace("\r\n", "\n").replace("\r", "\n")


@given(
    data=st.text(),
    id=st.text(alphabet="0123456789-\x00", max_size=12),
    event=st.sampled_from(["node_started", "workflow_state_changed", "a\x00b"]),
)
@settings(max_examples=300)
def test_encode_event_on_bytes_is_encode_exactly(data: str, id: str, event: str) -> None:
    # The hub frames live events from the published bytes without decoding them.
    assert sse.encode_event(id.encode(), event.encode(), data.encode()) == sse.encode(
        data, id=id, event=event
    )
