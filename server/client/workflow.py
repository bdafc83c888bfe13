"""`WorkflowClient`: read a workflow's events, progress and end from Python, as EventSource
would (reconnect with Last-Event-ID, honour `retry:`, stop on 204), with loss surfaced."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import random
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import aiohttp

from server.client.sse import EventStreamParser, ServerSentEvent
from server.models import TERMINAL_STATES

logger = logging.getLogger(__name__)

DEFAULT_RETRY_MS = 3000  # EventSource's usual default, and the server's RETRY_MS default
MAX_DELAY = 30.0  # seconds: no `retry:` or `Retry-After` makes a script wait longer
READ_TIMEOUT = 60.0  # no byte (not even the 15 s keep-alive) for this long: reconnect


@dataclass(frozen=True, slots=True)
class Event:
    """A stored workflow event: its stream id, its `event_type` and the event as JSON."""

    id: str
    event: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        """The workflow reached COMPLETED, FAILED or CANCELLED with this event."""
        return (
            self.event == "workflow_state_changed" and self.data.get("to_state") in TERMINAL_STATES
        )


@dataclass(frozen=True, slots=True)
class Gap:
    """Events after `requested` were trimmed away before they could be read: the stream goes
    on from `earliest_available`; `progress` is the whole picture as of the gap, to redraw."""

    requested: str
    earliest_available: str
    progress: dict[str, Any]


Message = Event | Gap


class ClientError(Exception):
    """Base of the client's own errors."""


class ProblemError(ClientError):
    """The server refused the request (a 4xx, or a 5xx it will not retry): its problem+json."""

    def __init__(self, status: int, title: str, detail: str, body: dict[str, Any]) -> None:
        super().__init__(f"{status} {title}: {detail}" if detail else f"{status} {title}")
        self.status, self.title, self.detail, self.body = status, title, detail, body


class Unavailable(ClientError, TimeoutError):
    """No stream could be (re)opened before the caller's `deadline`."""


def is_final(progress: dict[str, Any]) -> bool:
    """A progress object of a workflow in a terminal state."""
    return progress.get("state") in TERMINAL_STATES


class WorkflowClient:
    """`async with WorkflowClient(base_url, token=...) as c:` then `c.events(id)`,
    `await c.progress(id)`, `await c.wait(id)`.

    `session`, if given, is used and left open (the caller owns it); otherwise the client
    opens one and closes it on exit. `max_delay` caps every wait between reconnects (the
    server's `retry:` and `Retry-After` are honoured up to it); `jitter` adds up to that
    share of the wait at random, so that many scripts dropped together do not come back in
    the same millisecond.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        session: aiohttp.ClientSession | None = None,
        *,
        max_delay: float = MAX_DELAY,
        jitter: float = 0.1,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        if max_delay < 0 or jitter < 0 or read_timeout <= 0:
            raise ValueError("max_delay and jitter must be >= 0 and read_timeout > 0")
        self.base_url = base_url.rstrip("/")
        self.max_delay, self.jitter, self.read_timeout = max_delay, jitter, read_timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session = session
        self._owns_session = session is None
        # workflow id -> (ETag, progress): a poll that changed nothing costs a 304, no body.
        self._progress: dict[str, tuple[str, dict[str, Any]]] = {}

    async def __aenter__(self) -> Self:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use the client as `async with WorkflowClient(...) as client`")
        return self._session

    def _url(self, workflow_id: str, what: str) -> str:
        return f"{self.base_url}/workflows/{quote(workflow_id, safe='')}/{what}"

    async def events(
        self,
        workflow_id: str,
        last_event_id: str | None = None,
        *,
        deadline: float | None = None,
    ) -> AsyncGenerator[Message, None]:
        """The workflow's events after `last_event_id` (None: all retained), replay then
        live, until the server ends the stream after the terminal event or answers 204.

        Reconnects like EventSource, so a dropped connection loses and repeats nothing.
        `deadline`: seconds of failing to reconnect (refused, 503) before `Unavailable`;
        None retries for ever, as a browser does. A trimmed history yields a `Gap`.

        Leaving the loop early keeps the connection open until the generator is collected:
        wrap it in `contextlib.aclosing()` to close it at once."""
        url = self._url(workflow_id, "events")
        frames = self._stream(url, last_event_id, deadline, ends=_is_terminal_frame)
        async with contextlib.aclosing(frames):
            async for frame in frames:
                if frame.event == "gap":
                    body = json.loads(frame.data)
                    yield Gap(body["requested"], body["earliest_available"], body["progress"])
                else:
                    yield Event(frame.id, frame.event, json.loads(frame.data))

    async def progress(self, workflow_id: str) -> dict[str, Any]:
        """The workflow's progress object (SPEC "Progress"); unchanged since the last call
        (same ETag), the server answers 304 and the cached object is returned."""
        headers = dict(self._headers)
        cached = self._progress.get(workflow_id)
        if cached is not None:
            headers["If-None-Match"] = cached[0]
        timeout = aiohttp.ClientTimeout(total=self.read_timeout)
        async with self.session.get(
            self._url(workflow_id, "progress"), headers=headers, timeout=timeout
        ) as resp:
            if resp.status == 304 and cached is not None:
                return cached[1]
            if resp.status != 200:
                raise await _problem(resp)
            body: dict[str, Any] = await resp.json()
            etag = resp.headers.get("ETag")
            if etag:
                self._progress[workflow_id] = (etag, body)
            return body

    async def wait(
        self, workflow_id: str, timeout: float | None = None, *, deadline: float | None = None
    ) -> dict[str, Any]:
        """The final progress object, once the workflow is COMPLETED, FAILED or CANCELLED.

        Reads the progress stream (`Accept: text/event-stream` on /progress), not the events:
        it costs one object per change (at most 4 a second), whatever the history's length.
        An unknown workflow (no event yet) is a 404 `ProblemError`. `timeout`: seconds in all,
        then `TimeoutError`."""
        url = self._url(workflow_id, "progress")
        frames = self._stream(url, None, deadline, ends=_is_final_frame)
        async with asyncio.timeout(timeout), contextlib.aclosing(frames):
            async for frame in frames:
                if frame.event == "progress":
                    progress: dict[str, Any] = json.loads(frame.data)
                    if is_final(progress):
                        return progress
        # A 204: the server says the final object was sent already; ask for it plainly.
        return await self.progress(workflow_id)

    async def _stream(
        self,
        url: str,
        last_event_id: str | None,
        deadline: float | None,
        *,
        ends: Callable[[ServerSentEvent], bool],
    ) -> AsyncGenerator[ServerSentEvent, None]:
        """The frames of `url` across reconnects, until a response that ends right after a
        frame for which `ends` is true, or a 204."""
        loop = asyncio.get_running_loop()
        retry_ms = DEFAULT_RETRY_MS
        give_up: float | None = None  # set by the first failure since the last stream
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.read_timeout)
        while True:
            headers = {**self._headers, "Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            wait = retry_ms / 1000
            try:
                async with self.session.get(url, headers=headers, timeout=timeout) as resp:
                    if resp.status == 204:
                        return  # the end was already sent: EventSource stops here too
                    if resp.status == 503:
                        wait = _retry_after(resp.headers.get("Retry-After"), wait)
                        logger.info("%s answered 503; again in %.1f s", url, wait)
                    elif resp.status != 200:
                        raise await _problem(resp)
                    elif not resp.content_type.startswith("text/event-stream"):
                        raise ClientError(f"{url} answered {resp.content_type}, not a stream")
                    else:
                        give_up = None
                        parser = EventStreamParser(last_event_id or "")
                        last: ServerSentEvent | None = None
                        async for chunk in resp.content.iter_any():
                            for frame in parser.feed(chunk):
                                last_event_id = parser.last_event_id or None
                                last = frame
                                yield frame
                            retry_ms = parser.retry if parser.retry is not None else retry_ms
                            last_event_id = parser.last_event_id or None
                        if last is not None and ends(last):
                            return
                        wait = retry_ms / 1000
                        logger.info("%s ended; reconnecting in %.1f s", url, wait)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                logger.info("%s: %s; reconnecting in %.1f s", url, exc or type(exc).__name__, wait)
            wait = min(wait, self.max_delay) * (1 + self.jitter * random.random())
            if give_up is None and deadline is not None:
                give_up = loop.time() + deadline
            if give_up is not None and loop.time() + wait > give_up:
                raise Unavailable(f"{url}: no stream within {deadline} s")
            await asyncio.sleep(wait)


def _is_terminal_frame(frame: ServerSentEvent) -> bool:
    if frame.event != "workflow_state_changed":
        return False
    try:
        return json.loads(frame.data).get("to_state") in TERMINAL_STATES
    except (ValueError, AttributeError):
        return False


def _is_final_frame(frame: ServerSentEvent) -> bool:
    try:
        return frame.event == "progress" and is_final(json.loads(frame.data))
    except (ValueError, AttributeError):
        return False


def _retry_after(value: str | None, default: float) -> float:
    """Seconds from a Retry-After header (delay-seconds or an HTTP date)."""
    if not value:
        return default
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


async def _problem(resp: aiohttp.ClientResponse) -> ProblemError:
    """The problem+json of a refused request, or what can be said without one."""
    text = await resp.text(errors="replace")
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"detail": text[:500]}
    title = str(body.get("title") or resp.reason or "Error")
    return ProblemError(resp.status, title, str(body.get("detail") or ""), body)
