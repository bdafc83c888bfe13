"""An incremental `text/event-stream` parser that follows the WHATWG rules.

Feed it the bytes of one response as they arrive, in chunks cut anywhere; it returns the
messages an EventSource would dispatch. It does no I/O, so it is tested with exact bytes.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

# CRLF first, so that a CR followed by LF is one line end, not two.
_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched message: its type, its data lines joined with LF, and the last event
    id as of its dispatch (kept across messages, as EventSource's `lastEventId` is)."""

    event: str
    data: str
    id: str


class EventStreamParser:
    """Feed bytes, get messages; `retry` and `last_event_id` follow the stream's fields.

    One parser per response; a reconnect passes the previous `last_event_id` on, since the
    id belongs to the event source, not to one connection."""

    __slots__ = (
        "_buffer",
        "_cr_pending",
        "_data",
        "_decoder",
        "_event",
        "_id",
        "_started",
        "last_event_id",
        "retry",
    )

    def __init__(self, last_event_id: str = "") -> None:
        # An incremental decoder, since a chunk may end inside a multi-byte character.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._started = False  # the first character was seen (and a BOM dropped)
        self._cr_pending = False  # the last line ended with CR: an LF next is its CRLF
        self._data: list[str] = []
        self._event = ""
        self._id = last_event_id  # the "last event ID buffer" of the spec
        self.last_event_id = last_event_id
        self.retry: int | None = None  # the reconnection time in ms, once the stream sets it

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """The messages completed by `chunk` (possibly none)."""
        text = self._decoder.decode(chunk)
        if not text:
            return []
        if not self._started:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._cr_pending:
            self._cr_pending = False
            text = text.removeprefix("\n")
        buffer = self._buffer + text
        out: list[ServerSentEvent] = []
        pos = 0
        while (end := _LINE_END.search(buffer, pos)) is not None:
            message = self._line(buffer[pos : end.start()])
            if message is not None:
                out.append(message)
            pos = end.end()
        # A CR at the very end ends its line now (a CR-only stream must not stall); an LF
        # arriving in the next chunk is the second half of a CRLF, not an empty line.
        self._cr_pending = pos == len(buffer) and buffer.endswith("\r")
        self._buffer = buffer[pos:]
        return out

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment (the server's keep-alive)
        name, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry = int(value)
        return None  # any other field is ignored

    def _dispatch(self) -> ServerSentEvent | None:
        self.last_event_id = self._id
        data, event = self._data, self._event or "message"
        self._data, self._event = [], ""
        if not data:
            return None  # no data line: nothing is dispatched (but the id still counts)
        return ServerSentEvent(event=event, data="\n".join(data), id=self.last_event_id)
