"""A small event-stream parser and client for the tests (follows the WHATWG rules)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Message:
    """One dispatched SSE message (or a comment, with `comment` set)."""

    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None
    comment: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class Parser:
    """Incremental parser: feed bytes, get messages. CR, LF and CRLF end lines."""

    buffer: bytes = b""
    _data: list[str] = field(default_factory=list)
    _event: str | None = None
    _id: str | None = None
    _retry: int | None = None
    _has_fields: bool = False

    def feed(self, chunk: bytes) -> list[Message]:
        self.buffer += chunk
        out: list[Message] = []
        while True:
            cut = -1
            for i, b in enumerate(self.buffer):
                if b in (0x0A, 0x0D):
                    cut = i
                    break
            if cut < 0:
                return out
            # A CR at the very end may be the first half of CRLF: wait for more.
            if self.buffer[cut] == 0x0D and cut + 1 == len(self.buffer):
                return out
            line = self.buffer[:cut].decode("utf-8")
            step = 2 if self.buffer[cut : cut + 2] == b"\r\n" else 1
            self.buffer = self.buffer[cut + step :]
            msg = self._line(line)
            if msg is not None:
                out.append(msg)

    def _line(self, line: str) -> Message | None:
        if line == "":
            if not self._has_fields:
                return None
            msg = Message(
                event=self._event or "message",
                data="\n".join(self._data),
                id=self._id,
                retry=self._retry,
            )
            self._data, self._event, self._id, self._retry = [], None, None, None
            self._has_fields = False
            return msg
        if line.startswith(":"):
            return Message(event="", comment=line[1:].lstrip(" "))
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        self._has_fields = True
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None


async def iter_messages(resp: aiohttp.ClientResponse) -> AsyncIterator[Message]:
    """Messages of an open response, comments included, until the server ends it."""
    parser = Parser()
    async for chunk in resp.content.iter_any():
        for msg in parser.feed(chunk):
            yield msg


async def collect(
    session: aiohttp.ClientSession,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    until_terminal: bool = True,
    timeout: float = 30.0,
) -> list[Message]:
    """Read a stream until the server ends it; returns the event messages (no comments)."""
    out: list[Message] = []

    async def run() -> None:
        async with session.get(url, headers=headers) as resp:
            assert resp.status == 200, (resp.status, await resp.text())
            async for msg in iter_messages(resp):
                if msg.comment is None and msg.data:
                    out.append(msg)

    await asyncio.wait_for(run(), timeout)
    return out
