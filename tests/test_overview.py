"""The live overview over the wire: GET /workflows with Accept: text/event-stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from server import app_keys, auth
from server.overview import feed as feed_module
from server.overview.summaries import list_page
from testing.events import completed, plan, started, state
from testing.http import publish
from tests.conftest import Serve
from tests.test_runs import SECRET

pytestmark = pytest.mark.backends("fakeredis", "redis", "cluster")

SSE = {"Accept": "text/event-stream"}


class Overview:
    """An open overview stream, parsed frame by frame."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.frames: list[dict[str, Any]] = []

    async def next_run(self, timeout: float = 10.0) -> dict[str, Any]:
        event, data = None, None
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.resp.content.readline()).decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif line == "" and event is not None:
                    assert event == "run"
                    assert data is not None
                    summary: dict[str, Any] = json.loads(data)
                    self.frames.append(summary)
                    return summary

    async def until(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            summary = await self.next_run(max(deadline - time.monotonic(), 0.01))
            if match(summary):
                return summary


@asynccontextmanager
async def overview(
    base: str, headers: dict[str, str] | None = None, **query: str
) -> AsyncIterator[Overview]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{base}/workflows", params=query, headers={**SSE, **(headers or {})}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert (await resp.content.readline()).startswith(b"retry: ")
        await resp.content.readline()
        yield Overview(resp)


async def test_first_page_then_each_change_within_a_second(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base = await serve()
    definition = "def-" + uuid.uuid4().hex[:8]
    old, fresh = new_workflow(), new_workflow()
    await publish(base, old, [plan(definition, "a", "b"), state("RUNNING")])
    async with overview(base, definition_id=definition) as feed:
        first = await feed.next_run()
        assert (first["workflow_id"], first["completed_nodes"]) == (old, 0)
        # A change of a run already listed.
        sent = time.monotonic()
        await publish(base, old, [started("a"), {"event_type": "node_completed", "node_id": "a"}])
        summary = await feed.until(lambda s: s["workflow_id"] == old and s["completed_nodes"] == 1)
        assert time.monotonic() - sent < 1.0
        assert summary["percentage"] == 50.0
        # A run that did not exist when the stream opened.
        sent = time.monotonic()
        await publish(base, fresh, [plan(definition, "a"), state("RUNNING")])
        summary = await feed.until(lambda s: s["workflow_id"] == fresh)
        assert time.monotonic() - sent < 1.0
        assert summary["state"] == "RUNNING" and summary["total_nodes"] == 1
        # The end of a run.
        await publish(base, old, [state("COMPLETED")])
        summary = await feed.until(lambda s: s["workflow_id"] == old and s["state"] == "COMPLETED")
        assert summary["percentage"] == 100.0 and summary["estimated_remaining_seconds"] == 0.0
    async with aiohttp.ClientSession() as s, s.get(f"{base}/metrics") as resp:
        text = await resp.text()
    figures = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert float(figures["wfsse_overview_frames_total"]) >= 3
    assert float(figures["wfsse_run_index_writes_total"]) >= 3


async def test_frames_keep_to_the_filter_and_at_most_four_a_second_per_run(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base = await serve()
    definition = "def-" + uuid.uuid4().hex[:8]
    wf, other = new_workflow(), new_workflow()
    await publish(base, wf, [plan(definition, *[f"n{i}" for i in range(40)]), state("RUNNING")])
    await publish(base, other, [plan("def-other-" + uuid.uuid4().hex[:6], "a"), state("RUNNING")])
    async with overview(base, definition_id=definition, state="RUNNING") as feed:
        assert (await feed.next_run())["workflow_id"] == wf
        started_at = time.monotonic()
        for i in range(40):  # 40 changes as fast as they go
            await publish(base, wf, [{"event_type": "node_completed", "node_id": f"n{i}"}])
            await publish(base, other, [started("a")])
        await feed.until(lambda s: s["completed_nodes"] == 40, timeout=10)
        took = time.monotonic() - started_at
        assert all(s["workflow_id"] == wf for s in feed.frames)
        changes = len(feed.frames) - 1
        assert changes <= 4 * took + 2, (changes, took)
        counts = [s["completed_nodes"] for s in feed.frames]
        assert counts == sorted(counts)


async def test_a_run_leaving_the_filter_is_sent_once_more_so_a_list_can_drop_it(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    """A stream filtered on RUNNING gets the COMPLETED summary of a run it listed (without
    it, a live list of running runs would show a finished one as running for ever), and
    nothing after that."""
    base = await serve()
    definition = "def-" + uuid.uuid4().hex[:8]
    wf, other = new_workflow(), new_workflow()
    await publish(base, wf, [plan(definition, "a", "b"), state("RUNNING")])
    async with overview(base, definition_id=definition, state="RUNNING") as feed:
        assert (await feed.next_run())["workflow_id"] == wf
        await publish(base, wf, [state("COMPLETED")])
        summary = await feed.next_run()
        assert (summary["workflow_id"], summary["state"]) == (wf, "COMPLETED")
        await publish(base, other, [plan(definition, "a"), state("RUNNING")])
        assert (await feed.next_run())["workflow_id"] == other  # not wf again


async def test_a_frame_queued_while_the_first_page_is_read_never_follows_it_older(
    serve: Serve, new_workflow: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change the feed queues for a new stream while its first page is being read is
    written after that page: when the page already holds a later state of the run, the
    queued frame is older and must not follow it (a list's bar would move back)."""
    base = await serve()
    app = serve.apps[-1]
    definition = "def-" + uuid.uuid4().hex[:8]
    wf = new_workflow()
    await publish(base, wf, [plan(definition, "a", "b", "c"), state("RUNNING")])
    real = list_page  # the one overview_feed imported

    async def first_page_after_two_changes(*args: Any, **kwargs: Any) -> Any:
        client = next(iter(app[app_keys.overview_key].clients))
        await publish(base, wf, [started("a"), completed("a")])
        async with asyncio.timeout(15):  # a loaded CI box: the feed may be busy
            while not client.frames:  # the feed has queued "1 of 3" for this stream
                await asyncio.sleep(0.01)
        await publish(base, wf, [started("b"), completed("b")])
        return await real(*args, **kwargs)  # "2 of 3"

    monkeypatch.setattr(feed_module, "list_page", first_page_after_two_changes)
    async with overview(base, definition_id=definition) as feed:
        first = await feed.next_run()
        assert first["completed_nodes"] == 2
        with contextlib.suppress(TimeoutError):
            while True:
                await feed.next_run(timeout=1.0)
    counts = [s["completed_nodes"] for s in feed.frames]
    assert counts == sorted(counts), counts


async def test_watchers_show_up_in_the_overview(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base = await serve()
    definition = "def-" + uuid.uuid4().hex[:8]
    wf = new_workflow()
    await publish(base, wf, [plan(definition, "a"), state("RUNNING")])
    async with overview(base, definition_id=definition) as feed:
        assert (await feed.next_run())["watchers"] == 0
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{base}/workflows/{wf}/events", headers=SSE) as stream,
        ):
            assert stream.status == 200
            summary = await feed.until(lambda s: s["watchers"] == 1, timeout=5)
            assert summary["workflow_id"] == wf
        await feed.until(lambda s: s["watchers"] == 0, timeout=5)


async def test_a_token_sees_only_its_runs_in_the_overview(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base = await serve(subscribe_secret=SECRET)
    definition = "def-" + uuid.uuid4().hex[:8]
    mine, theirs = new_workflow(), new_workflow()
    for wf in (mine, theirs):
        await publish(base, wf, [plan(definition, "a"), state("RUNNING")])
    async with aiohttp.ClientSession() as s, s.get(f"{base}/workflows", headers=SSE) as resp:
        assert resp.status == 401
    token = auth.mint(SECRET, [mine], 60)
    async with overview(base, {"Authorization": f"Bearer {token}"}) as feed:
        assert (await feed.next_run())["workflow_id"] == mine
        await publish(base, theirs, [state("PAUSED")])
        await publish(base, mine, [state("PAUSED")])
        await feed.until(lambda s: s["state"] == "PAUSED")
        assert {s["workflow_id"] for s in feed.frames} == {mine}
