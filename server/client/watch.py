"""`python -m server watch <workflow_id>`: a workflow's live progress in a terminal.

~430 lines: the view (a pure fold of progress objects and events into lines), its drawing
for a terminal or a pipe, and the reconnecting read loop with the messages the tests check;
the view alone would not be worth a module of its own."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import re
import shutil
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

import aiohttp

from server.client.sse import EventStreamParser, ServerSentEvent
from server.models import TERMINAL_STATES, is_workflow_id, parse_event_id

DEFAULT_URL = "http://127.0.0.1:8080"
PROGRESS_EVERY = 0.5  # seconds between two /progress fetches
READ_TIMEOUT = 60.0  # no byte (not even a keep-alive) for this long: reconnect
MAX_BACKOFF = 10.0
BAR_WIDTH = 24
# Control characters (ESC included) in event text could drive the terminal: shown as spaces.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def format_duration(seconds: float) -> str:
    """`2 min 30 s`, `45 s`, `1 h 5 min`, `0.8 s`."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        m, s = divmod(s, 60)
        return f"{m} min {s} s" if s else f"{m} min"
    h, rest = divmod(s, 3600)
    return f"{h} h {rest // 60} min"


def local_time(timestamp: str | None) -> str:
    """An event's RFC 3339 timestamp as local HH:MM:SS (the receive time when absent)."""
    try:
        when = datetime.fromisoformat(timestamp) if timestamp else datetime.now()
    except ValueError:
        when = datetime.now()
    return when.astimezone().strftime("%H:%M:%S")


def clip(text: str, width: int) -> str:
    """Cut `text` to at most `width` terminal cells."""
    out, used = [], 0
    for c in text:
        w = 2 if unicodedata.east_asian_width(c) in "WF" else 1
        if used + w > width:
            break
        out.append(c)
        used += w
    return "".join(out)


@dataclass
class NodeView:
    name: str
    status: str = "pending"
    started: float | None = None  # time.monotonic() of the last node_started seen live


@dataclass
class View:
    """What the terminal shows: folded from events, numbers from /progress when it answers."""

    out: TextIO
    tty: bool
    nodes: dict[str, NodeView] = field(default_factory=dict)
    state: str | None = None
    progress: dict[str, Any] | None = None
    progress_at: float = 0.0
    first_at: datetime | None = None  # timestamps of the first and the latest event seen
    last_at: datetime | None = None
    last_id: str | None = None  # the latest event id seen
    complete: bool = True  # every event since the first was folded here (no gap)
    _status_shown: str = ""  # the last status line written (plain mode prints only changes)

    # --- folding events -------------------------------------------------------------
    def node(self, node_id: str, name: str | None = None) -> NodeView:
        view = self.nodes.get(node_id)
        if view is None:
            view = self.nodes[node_id] = NodeView(name or node_id)
        elif name:
            view.name = name
        return view

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("event_type")
        with contextlib.suppress(TypeError, ValueError):
            self.last_at = datetime.fromisoformat(str(event.get("timestamp")))
            self.first_at = self.first_at or self.last_at
        node_id = event.get("node_id")
        if kind == "workflow_planned":
            for planned in event.get("nodes", []):
                self.node(planned["node_id"], planned.get("node_name"))
        elif kind == "workflow_state_changed":
            self.state = event.get("to_state")
        elif isinstance(node_id, str):
            node = self.node(node_id, event.get("node_name"))
            if kind == "node_started":
                node.status, node.started = "running", time.monotonic()
            elif kind == "node_completed":
                node.status = "completed"
            elif kind == "node_failed":
                node.status = "failed"
            elif kind == "node_skipped":
                node.status = "skipped"

    def describe(self, event: dict[str, Any]) -> str:
        """One event as a line of text."""
        kind = str(event.get("event_type"))
        node_id = event.get("node_id")
        label = ""
        if isinstance(node_id, str):
            name = self.nodes[node_id].name if node_id in self.nodes else node_id
            label = name if name == node_id else f"{name} ({node_id})"
        if kind == "workflow_planned":
            nodes = event.get("nodes", [])
            definition = event.get("definition_id")
            detail = f"{len(nodes)} nodes" + (f" of {definition}" if definition else "")
        elif kind == "workflow_state_changed":
            detail = f"{event.get('from_state') or '?'} -> {event.get('to_state')}"
            if event.get("reason"):
                detail += f" ({event['reason']})"
        elif kind == "node_completed" and isinstance(event.get("duration_ms"), int):
            detail = f"{label}  {format_duration(event['duration_ms'] / 1000)}"
        elif kind == "node_failed":
            detail = f"{label}  error: {event.get('error')}"
        elif kind == "node_progress":
            detail = f"{label}  {100 * float(event.get('fraction', 0)):.0f}%"
            if event.get("message"):
                detail += f"  {event['message']}"
        elif kind == "node_skipped" and event.get("reason"):
            detail = f"{label}  ({event['reason']})"
        else:
            detail = label
        detail = _CONTROL.sub(" ", detail)  # one line per event, and no terminal escapes
        return f"{local_time(event.get('timestamp'))}  {kind:<22}  {detail}"

    # --- the numbers ----------------------------------------------------------------
    def local_counts(self) -> tuple[float, int, int, list[str]]:
        """(percentage, done, total, running names) counted from the events seen."""
        total = len(self.nodes)
        done = sum(n.status in ("completed", "skipped") for n in self.nodes.values())
        pct = round(100 * done / total, 1) if total else 0.0
        if self.state == "COMPLETED":
            pct = 100.0
        return pct, done, total, [n.name for n in self.nodes.values() if n.status == "running"]

    def figures(self) -> tuple[float, int, int, float | None, list[str], str | None]:
        """(percentage, done, total, eta seconds, running names, state)."""
        p = self.progress
        if p is None:  # without /progress: count from the events seen
            pct, done, total, running = self.local_counts()
            return pct, done, total, None, running, self.state
        eta = p.get("estimated_remaining_seconds")
        if isinstance(eta, int | float):
            eta = max(0.0, eta - (time.monotonic() - self.progress_at))
        done = int(p.get("completed_nodes", 0)) + int(p.get("skipped_nodes", 0))
        running = [r.get("node_name") or r.get("node_id") for r in p.get("running") or []]
        state = self.state if self.state in TERMINAL_STATES else p.get("state")
        pct = 100.0 if state == "COMPLETED" else float(p.get("percentage") or 0.0)
        total = int(p.get("total_nodes", 0))
        # The snapshot lags the stream by up to one fetch; having folded every event since
        # the first, the local counts are the same fold one step further on.
        seen = parse_event_id(self.last_id or "")
        shown = parse_event_id(str(p.get("last_event_id") or ""))
        if self.complete and seen is not None and (shown is None or seen > shown):
            pct, done, total, running = self.local_counts()
            state = self.state or state
        return pct, done, total, eta, running, state

    def status_line(self, width: int | None = None) -> str:
        pct, done, total, eta, running, state = self.figures()
        full, empty = ("█", "░") if self.tty else ("#", ".")
        filled = round(BAR_WIDTH * min(max(pct, 0.0), 100.0) / 100)
        parts = [
            f"[{full * filled}{empty * (BAR_WIDTH - filled)}] {pct:5.1f}%",
            f"{done} of {total} nodes",
            state or "waiting",
        ]
        if state in TERMINAL_STATES:
            elapsed = (self.progress or {}).get("elapsed_seconds")
            ended = (self.progress or {}).get("state") in TERMINAL_STATES
            if not (ended and isinstance(elapsed, int | float)) and self.first_at and self.last_at:
                elapsed = (self.last_at - self.first_at).total_seconds()
            if isinstance(elapsed, int | float):
                parts.append(f"took {format_duration(elapsed)}")
        elif eta is not None:
            parts.append(f"about {format_duration(eta)} left" if eta >= 0.5 else "almost done")
        if running and state not in TERMINAL_STATES:
            parts.append("running: " + ", ".join(running))
        line = _CONTROL.sub(" ", "  ".join(parts))
        return clip(line, width) if width else line

    # --- output ---------------------------------------------------------------------
    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def line(self, text: str) -> None:
        """A line that scrolls (events, connection notes), kept above the status line."""
        if self.tty:
            self._write("\r\x1b[2K" + text + "\n" + self._status_text())
        else:
            self._write(text + "\n")

    def _status_text(self) -> str:
        width = max(20, shutil.get_terminal_size().columns - 1)
        return self.status_line(width)

    def redraw(self) -> None:
        """Refresh the status line: in place on a terminal, as a new line only when changed."""
        if self.tty:
            self._write("\r\x1b[2K" + self._status_text())
            return
        # Plain output: a progress line when the figures change, not on every ETA tick.
        pct, done, total, _, running, state = self.figures()
        key = f"{pct}|{done}|{total}|{state}|{running}"
        if key != self._status_shown:
            self._status_shown = key
            self._write(self.status_line() + "\n")

    def finish(self) -> None:
        if self.tty:
            self._write("\r\x1b[2K" + self._status_text() + "\n")
        else:
            self._status_shown = ""
            self.redraw()


class Fatal(Exception):
    """An answer that reconnecting will not fix (bad id, no permission)."""


@dataclass
class Watcher:
    """Follows one workflow's event stream, reconnecting with Last-Event-ID."""

    session: aiohttp.ClientSession
    base_url: str
    workflow_id: str
    view: View
    headers: dict[str, str]
    last_id: str | None = None
    retry_s: float = 3.0
    _wanted: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def events_url(self) -> str:
        return f"{self.base_url}/workflows/{self.workflow_id}/events"

    async def fetch_progress(self) -> None:
        """Fetch /progress for the numbers; without it (404, older server) fall back to counts."""
        url = f"{self.base_url}/workflows/{self.workflow_id}/progress"
        try:
            async with self.session.get(url, headers=self.headers) as resp:
                if resp.status == 200:
                    self.view.progress = await resp.json()
                    self.view.progress_at = time.monotonic()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            pass  # the numbers stay as they were; the stream is what matters

    async def _progress_loop(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            await self.fetch_progress()
            self.view.redraw()
            await asyncio.sleep(PROGRESS_EVERY)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.view.redraw()

    async def run(self) -> int:
        tasks = [asyncio.create_task(self._progress_loop())]
        if self.view.tty:
            tasks.append(asyncio.create_task(self._ticker()))
        try:
            return await self._follow()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(self) -> int:
        failures = 0
        connected_once = False
        while True:
            headers = {**self.headers, "Accept": "text/event-stream"}
            if self.last_id:
                headers["Last-Event-ID"] = self.last_id
            try:
                async with self.session.get(self.events_url, headers=headers) as resp:
                    if resp.status == 204:  # the workflow ended at or before our last event
                        await self.fetch_progress()
                        self.view.line("the workflow has ended; nothing more to read")
                        self.view.finish()
                        return 0
                    if resp.status != 200:
                        detail = (await resp.text())[:300]
                        if 400 <= resp.status < 500 and resp.status not in (408, 429):
                            raise Fatal(f"HTTP {resp.status}: {detail}")
                        raise aiohttp.ClientResponseError(
                            resp.request_info, (), status=resp.status, message=detail
                        )
                    where = f" after event {self.last_id}" if self.last_id else ""
                    verb = "reconnected" if connected_once else "connected"
                    self.view.line(f"{verb} to {self.events_url}{where}")
                    connected_once = True
                    failures = 0
                    if await self._read(resp):
                        await self.fetch_progress()
                        self.view.finish()
                        return 0
                    reason = "the server ended the stream"
            except Fatal:
                raise
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                reason = str(exc) or type(exc).__name__
            failures += 1
            delay = min(MAX_BACKOFF, self.retry_s * (1 if failures <= 1 else 1.5 ** (failures - 1)))
            self.view.line(
                f"connection lost ({' '.join(reason.split())}); reconnecting in {delay:.1f} s"
            )
            await asyncio.sleep(delay)

    async def _read(self, resp: aiohttp.ClientResponse) -> bool:
        """Print the events of one response; True once the terminal state was seen."""
        parser = EventStreamParser(self.last_id or "")
        while True:
            chunk = await asyncio.wait_for(resp.content.readany(), READ_TIMEOUT)
            if not chunk:
                return False
            frames = parser.feed(chunk)
            if parser.retry is not None:
                self.retry_s = parser.retry / 1000
            for msg in frames:
                if not msg.data:
                    continue
                if msg.event == "gap":
                    self._gap(msg)
                    continue
                if msg.id:
                    self.last_id = self.view.last_id = msg.id
                try:
                    event = json.loads(msg.data)
                except ValueError:
                    continue
                if not isinstance(event, dict):
                    continue
                self.view.apply(event)
                self.view.line(self.view.describe(event))
                self._wanted.set()
                if (
                    event.get("event_type") == "workflow_state_changed"
                    and event.get("to_state") in TERMINAL_STATES
                ):
                    return True

    def _gap(self, msg: ServerSentEvent) -> None:
        try:
            gap = json.loads(msg.data)
        except ValueError:
            gap = {}
        if not isinstance(gap, dict):
            gap = {}
        self.view.line(
            f"events after {gap.get('requested')} up to {gap.get('earliest_available')} were "
            "trimmed from the server's history; figures redrawn from its progress snapshot"
        )
        self.view.complete = False
        if isinstance(gap.get("progress"), dict):
            self.view.progress = gap["progress"]
            self.view.progress_at = time.monotonic()
        self._wanted.set()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m server watch",
        description="Follow a workflow live: progress bar, ETA, running nodes and events.",
    )
    parser.add_argument("workflow_id")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})")
    parser.add_argument(
        "--token", default=None, help="subscriber token, when the server has SUBSCRIBE_SECRET set"
    )
    return parser.parse_args(argv)


async def watch(url: str, workflow_id: str, view: View, token: str | None = None) -> int:
    """Follow `workflow_id` on the server at `url` until its terminal state; the exit code."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        watcher = Watcher(session, url.rstrip("/"), workflow_id, view, headers)
        return await watcher.run()


def main(argv: list[str]) -> int:
    """Entry point of `python -m server watch`."""
    args = parse_args(argv)
    if not is_workflow_id(args.workflow_id):
        print(f"error: {args.workflow_id!r} is not a valid workflow id", file=sys.stderr)
        return 2
    out = sys.stdout
    if isinstance(out, io.TextIOWrapper):
        out.reconfigure(errors="replace")
    view = View(out=out, tty=out.isatty())
    try:
        return asyncio.run(watch(args.url, args.workflow_id, view, args.token))
    except Fatal as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            out.write("\n")
        return 130
