"""SSE framing (the WHATWG event-stream format) as pure functions over bytes."""

from __future__ import annotations

import re

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# A field value may not hold CR or LF (they end the line) and NUL makes browsers drop `id:`.
_FIELD_UNSAFE = re.compile(r"[\r\n\x00]")


def encode(
    data: str | None = None,
    *,
    id: str | None = None,
    event: str | None = None,
    retry: int | None = None,
) -> bytes:
    """One event-stream message; data is split on CR, LF and CRLF into several `data:` lines."""
    lines: list[str] = []
    if id is not None:
        lines.append("id: " + _FIELD_UNSAFE.sub("", id))
    if event is not None:
        lines.append("event: " + _FIELD_UNSAFE.sub("", event))
    if retry is not None:
        if retry < 0:
            raise ValueError(f"retry must be >= 0, got {retry}")
        lines.append(f"retry: {retry}")
    if data is not None:
        lines.extend("data: " + part for part in _LINE_BREAK.split(data))
    if not lines:
        raise ValueError("an SSE message needs at least one field")
    return ("\n".join(lines) + "\n\n").encode()


def encode_event(id: bytes, event: bytes, data: bytes) -> bytes:
    """encode(data, id=id, event=event) for ASCII-safe `id` and `event` and UTF-8 `data`,
    without decoding: the hub frames each live event with this. One line of JSON (the
    stored form) has no CR or LF, so it is one `data:` line; anything else takes encode().
    """
    if b"\n" in data or b"\r" in data or b"\x00" in id or b"\x00" in event:
        return encode(data.decode(), id=id.decode(), event=event.decode())
    return b"id: %b\nevent: %b\ndata: %b\n\n" % (id, event, data)


def comment(text: str = "") -> bytes:
    """A comment line, ignored by clients: keeps proxies and idle timeouts from closing us."""
    return b":" + (" " + _LINE_BREAK.sub(" ", text) if text else "").encode() + b"\n\n"


KEEP_ALIVE = comment("keep-alive")


def http_chunk(data: bytes) -> bytes:
    """`data` as one HTTP/1.1 chunk (chunked transfer encoding): how SSE bytes written
    straight to the transport (the hub's direct writes) go on the wire of an HTTP/1.1
    response, where aiohttp would otherwise frame them."""
    return b"%x\r\n%b\r\n" % (len(data), data)
