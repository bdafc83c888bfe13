"""The event stream as the tests read it, over the public client's parser.

`server.client.EventStreamParser` does the parsing (line ends, decoding, the BOM, field
rules); `Parser` only keeps what an EventSource hides and a test asserts: comments (the
keep-alive), each frame's own `id:` and `retry:` (None when the frame has none, where the
client keeps the last event id), and frames without data (a `retry:` alone).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from server.client.sse import EventStreamParser, ServerSentEvent


@dataclass
class Message:
    """One frame of the stream (or a comment, with `comment` set)."""

    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None
    comment: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


class Parser(EventStreamParser):
    """Feed bytes, get the frames and comments they complete."""

    def __init__(self) -> None:
        super().__init__()
        self._out: list[Message] = []
        self._frame = False  # a field line was seen since the last blank line
        self._frame_event = ""
        self._frame_id_seen = False
        self._frame_retry: int | None = None

    def feed(self, chunk: bytes) -> list[Message]:  # type: ignore[override]
        super().feed(chunk)  # the frames are gathered by `_line` below, comments included
        out, self._out = self._out, []
        return out

    def _line(self, line: str) -> ServerSentEvent | None:
        if line.startswith(":"):
            self._out.append(Message(event="", comment=line[1:].lstrip(" ")))
            return None
        if line:
            self._frame = True
            name, _, value = line.partition(":")
            if name == "event":
                self._frame_event = value.removeprefix(" ")
            self._frame_id_seen |= name == "id"
            retry, self.retry = self.retry, None  # to see whether this line sets it
            super()._line(line)
            if self.retry is None:
                self.retry = retry
            else:
                self._frame_retry = self.retry
            return None
        sent = super()._line(line)  # a blank line: the client dispatches (if any data)
        if self._frame:
            self._out.append(
                Message(
                    event=sent.event if sent else self._frame_event or "message",
                    data=sent.data if sent else "",
                    id=self.last_event_id if self._frame_id_seen else None,
                    retry=self._frame_retry,
                )
            )
        self._frame, self._frame_event, self._frame_id_seen = False, "", False
        self._frame_retry = None
        return sent


async def iter_messages(resp: aiohttp.ClientResponse) -> AsyncIterator[Message]:
    """Frames of an open response, comments included, until the server ends it."""
    parser = Parser()
    async for chunk in resp.content.iter_any():
        for msg in parser.feed(chunk):
            yield msg


async def collect(
    session: aiohttp.ClientSession,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> list[Message]:
    """Read one response until the server ends it; its event frames (no comments, none
    without data). One response, no reconnect: for a client that reconnects, see
    `server.client.WorkflowClient`."""
    out: list[Message] = []

    async def run() -> None:
        async with session.get(url, headers=headers) as resp:
            assert resp.status == 200, (resp.status, await resp.text())
            async for msg in iter_messages(resp):
                if msg.comment is None and msg.data:
                    out.append(msg)

    await asyncio.wait_for(run(), timeout)
    return out
