"""Hostile conditions for open streams: a late SUBSCRIBE confirmation, huge events held for
a stalled reader (issue 12, items 6 and 18). Real sockets, a real Redis and fakeredis."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest

from server import store
from server.hub import Hub
from tests.conftest import Serve
from tests.sse_client import iter_messages

DONE = {"event_type": "workflow_state_changed", "to_state": "COMPLETED"}


async def publish(base: str, wf: str, events: list[dict[str, Any]]) -> list[str]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{base}/workflows/{wf}/events", json=events) as resp,
    ):
        assert resp.status == 201, await resp.text()
        ids: list[str] = (await resp.json())["ids"]
        return ids


@pytest.fixture
def held_confirmations(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, asyncio.Event]]:
    """Channels whose (S)SUBSCRIBE confirmation the hub gets only once the test sets the
    channel's event: a hub or Redis too loaded to answer in time."""
    held: dict[str, asyncio.Event] = {}
    dispatch = Hub._dispatch

    def late(hub: Hub, message: dict[str, Any], upstream: Any) -> None:
        name = message["channel"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        release = held.get(name)
        if message["type"] in ("subscribe", "ssubscribe") and release is not None:

            async def later() -> None:
                await release.wait()
                dispatch(hub, message, upstream)

            asyncio.get_running_loop().create_task(later())
            return
        dispatch(hub, message, upstream)

    monkeypatch.setattr(Hub, "_dispatch", late)
    yield held
    for release in held.values():
        release.set()


async def test_a_late_subscribe_confirmation_does_not_hold_back_a_finished_workflows_history(
    serve: Serve, new_workflow: Callable[[], str], held_confirmations: dict[str, asyncio.Event]
) -> None:
    base, wf = await serve(), new_workflow()
    ids = await publish(base, wf, [{"event_type": "node_started", "node_id": "a"}, DONE])
    held_confirmations[store.channel(wf)] = asyncio.Event()
    started = time.monotonic()
    got: list[str] = []
    async with aiohttp.ClientSession() as s, s.get(f"{base}/workflows/{wf}/events") as resp:
        assert resp.status == 200

        async def read() -> None:
            async for msg in iter_messages(resp):
                if msg.id is not None:
                    got.append(msg.id)

        # Before the fix: 200, then only keep-alives for as long as the confirmation is late.
        await asyncio.wait_for(read(), 8)
    assert got == ids
    assert time.monotonic() - started < 8


async def test_history_read_before_a_late_confirmation_is_read_again_after_it(
    serve: Serve, new_workflow: Callable[[], str], held_confirmations: dict[str, asyncio.Event]
) -> None:
    base, wf = await serve(), new_workflow()
    first = await publish(base, wf, [{"event_type": "node_started", "node_id": "a"}])
    release = held_confirmations[store.channel(wf)] = asyncio.Event()
    got: list[str] = []
    async with aiohttp.ClientSession() as s, s.get(f"{base}/workflows/{wf}/events") as resp:
        assert resp.status == 200
        messages = iter_messages(resp)

        async def next_id() -> str:
            async for msg in messages:
                if msg.id is not None:
                    return msg.id
            raise AssertionError("the stream ended")

        got.append(await asyncio.wait_for(next_id(), 8))  # the history, unconfirmed
        # Stored while the channel is unconfirmed: no live frame will ever carry it.
        unseen = await publish(base, wf, [{"event_type": "node_completed", "node_id": "a"}])
        release.set()
        got.append(await asyncio.wait_for(next_id(), 8))  # read again after the confirmation
        live = await publish(base, wf, [DONE])
        got.append(await asyncio.wait_for(next_id(), 8))  # and live from then on
    assert got == first + unseen + live


async def test_a_late_confirmation_does_not_hold_back_the_first_progress_object(
    serve: Serve, new_workflow: Callable[[], str], held_confirmations: dict[str, asyncio.Event]
) -> None:
    base, wf = await serve(), new_workflow()
    ids = await publish(base, wf, [{"event_type": "node_started", "node_id": "a"}])
    held_confirmations[store.channel(wf)] = asyncio.Event()
    headers = {"Accept": "text/event-stream"}
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{base}/workflows/{wf}/progress", headers=headers) as resp,
    ):
        assert resp.status == 200

        async def first() -> dict[str, Any]:
            async for msg in iter_messages(resp):
                if msg.event == "progress":
                    snap: dict[str, Any] = json.loads(msg.data)
                    return snap
            raise AssertionError("the stream ended")

        snap = await asyncio.wait_for(first(), 8)
    assert snap["last_event_id"] == ids[-1]
