"""server.client over real sockets: the real app (`serve`), and real server processes that
are SIGKILLed and started again on the same port."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from server.auth import mint
from server.client import Event, Gap, ProblemError, Unavailable, WorkflowClient
from server.client.workflow import _retry_after
from server.publisher import connect
from testing.events import DONE, started
from testing.http import publish
from testing.procs import ServerProcess, free_port
from tests.conftest import REDIS_URL, Serve

SECRET = "client-test-secret-of-32-bytes!!"


class Requests:
    """A trace of a session's requests: (monotonic start, method, url, headers, status)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.config = aiohttp.TraceConfig()
        self.config.on_request_start.append(self._start)
        self.config.on_request_end.append(self._end)
        self.config.on_request_exception.append(self._failed)

    async def _start(self, _s: Any, ctx: SimpleNamespace, params: Any) -> None:
        ctx.entry = {
            "at": time.monotonic(),
            "url": str(params.url),
            "headers": dict(params.headers),
            "status": None,
        }
        self.seen.append(ctx.entry)
        self.changed.set()

    async def _end(self, _s: Any, ctx: SimpleNamespace, params: Any) -> None:
        ctx.entry["status"] = params.response.status
        self.changed.set()

    async def _failed(self, _s: Any, ctx: SimpleNamespace, params: Any) -> None:
        ctx.entry["status"] = "error"
        self.changed.set()

    async def until(
        self, cond: Callable[[list[dict[str, Any]]], bool], timeout: float = 10
    ) -> None:
        async with asyncio.timeout(timeout):
            while not cond(self.seen):
                self.changed.clear()
                await self.changed.wait()


async def read_all(
    client: WorkflowClient, wf: str, last: str | None = None, deadline: float | None = None
) -> list[Event | Gap]:
    async with asyncio.timeout(15):
        return [m async for m in client.events(wf, last, deadline=deadline)]


async def test_events_replays_then_follows_live_in_order_and_ends_after_terminal(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    ids = await publish(base, wf, [started(f"a{i}") for i in range(3)])
    got: list[Event | Gap] = []
    replayed = asyncio.Event()

    async def read() -> None:
        async with WorkflowClient(base) as client:
            async for msg in client.events(wf):
                got.append(msg)
                if len(got) == 3:
                    replayed.set()

    reader = asyncio.create_task(read())
    await asyncio.wait_for(replayed.wait(), 10)
    ids += await publish(base, wf, [started("b0"), started("b1")])
    ids += await publish(base, wf, [DONE])
    await asyncio.wait_for(reader, 10)  # the iterator ended by itself after the terminal event
    assert all(isinstance(m, Event) for m in got)
    assert [m.id for m in got if isinstance(m, Event)] == ids
    assert [m.data["node_id"] for m in got[:5] if isinstance(m, Event)] == [
        "a0",
        "a1",
        "a2",
        "b0",
        "b1",
    ]
    last = got[-1]
    assert isinstance(last, Event) and last.event == "workflow_state_changed" and last.terminal


async def test_events_end_at_once_on_204_after_the_terminal_event(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    ids = await publish(base, wf, [started("a"), DONE])
    async with WorkflowClient(base) as client:
        assert await read_all(client, wf, ids[-1]) == []
        assert [m.id for m in await read_all(client, wf, ids[0]) if isinstance(m, Event)] == ids[1:]


async def test_trimmed_history_is_surfaced_as_a_gap_before_the_rest(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(history_maxlen=5), new_workflow()
    ids = await publish(base, wf, [*(started(f"n{i}") for i in range(10)), DONE])
    async with WorkflowClient(base) as client:
        got = await read_all(client, wf, ids[0])
    gap, *rest = got
    assert isinstance(gap, Gap)
    assert (gap.requested, gap.earliest_available) == (ids[0], ids[-5])
    assert gap.progress["workflow_id"] == wf and gap.progress["total_nodes"] == 10
    assert [m.id for m in rest if isinstance(m, Event)] == ids[-5:]


async def test_refusals_raise_with_the_problem_title(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(subscribe_secret=SECRET), new_workflow()
    cases = [
        (None, 401, "Unauthorized"),
        ("not-a-jwt", 401, "Unauthorized"),
        (mint(SECRET, ["someone-else"], 60), 403, "Forbidden"),
    ]
    for token, status, title in cases:
        async with WorkflowClient(base, token=token) as client:
            with pytest.raises(ProblemError) as refused:
                await read_all(client, wf)
            assert (refused.value.status, refused.value.title) == (status, title)
            assert refused.value.detail and title in str(refused.value)
            with pytest.raises(ProblemError) as refused:
                await client.progress(wf)
            assert refused.value.status == status
    async with WorkflowClient(base, token=mint(SECRET, [wf], 60)) as client:
        with pytest.raises(ProblemError) as unknown:
            await client.progress(wf)
        assert (unknown.value.status, unknown.value.title) == (404, "Not Found")
        with pytest.raises(ProblemError) as unknown:
            await client.wait(wf, timeout=10)
        assert unknown.value.status == 404
        with pytest.raises(ProblemError) as bad:
            await read_all(client, wf, "not-an-id")
        assert (bad.value.status, bad.value.title) == (400, "Bad Request")


async def test_progress_sends_if_none_match_and_returns_the_cached_object_on_304(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    ids = await publish(base, wf, [started("a")])
    trace = Requests()
    async with (
        aiohttp.ClientSession(trace_configs=[trace.config]) as session,
        WorkflowClient(base, session=session) as client,
    ):
        first = await client.progress(wf)
        again = await client.progress(wf)
        assert first["last_event_id"] == ids[0] and again == first
        ids += await publish(base, wf, [started("b")])
        changed = await client.progress(wf)
    assert changed["last_event_id"] == ids[1] and changed["running_nodes"] == 2
    assert [r["status"] for r in trace.seen] == [200, 304, 200]
    assert "If-None-Match" not in trace.seen[0]["headers"]
    assert trace.seen[1]["headers"]["If-None-Match"] == f'"{ids[0]}"'


async def test_wait_returns_the_final_progress(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    await publish(base, wf, [started("a")])
    async with WorkflowClient(base) as client:
        with pytest.raises(TimeoutError):
            await client.wait(wf, timeout=0.3)  # still running
        waiting = asyncio.create_task(client.wait(wf, timeout=15))
        await publish(base, wf, [{"event_type": "node_completed", "node_id": "a"}])
        ids = await publish(base, wf, [DONE])
        final = await waiting
        assert (final["state"], final["last_event_id"], final["percentage"]) == (
            "COMPLETED",
            ids[0],
            100.0,
        )
        again = await client.wait(wf, timeout=15)  # already over: at once
        assert (again["state"], again["last_event_id"]) == ("COMPLETED", ids[0])


async def test_503_is_retried_after_retry_after_until_a_stream_slot_frees(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(max_streams=1), new_workflow()
    trace = Requests()
    async with aiohttp.ClientSession() as holder_session:
        holder = await holder_session.get(f"{base}/workflows/{wf}/events")
        try:
            assert holder.status == 200
            async with (
                aiohttp.ClientSession(trace_configs=[trace.config]) as session,
                WorkflowClient(base, session=session, max_delay=0.2, jitter=0) as client,
            ):
                with pytest.raises(Unavailable):
                    await read_all(client, wf, deadline=1)
                refused = len(trace.seen)
                assert refused >= 2 and {r["status"] for r in trace.seen} == {503}
                # Retry-After (5 s) is honoured up to max_delay: neither a hot loop nor 5 s.
                spacing = [b["at"] - a["at"] for a, b in itertools.pairwise(trace.seen)]
                assert all(0.19 <= g < 1.0 for g in spacing), spacing
                reader = asyncio.create_task(read_all(client, wf))
                await trace.until(lambda seen: len(seen) >= refused + 2)  # refused again
                holder.close()
                ids = await publish(base, wf, [started("a"), DONE])
                got = await asyncio.wait_for(reader, 10)
        finally:
            holder.close()
    assert [m.id for m in got if isinstance(m, Event)] == ids
    assert trace.seen[-1]["status"] == 200


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("5", 5.0),
        (" 12 ", 12.0),
        (None, 3.0),
        ("", 3.0),
        ("soon", 3.0),
        ("-1", 3.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date in the past: at once
    ],
)
def test_retry_after_is_read_as_seconds_or_an_http_date(header: str | None, seconds: float) -> None:
    assert _retry_after(header, 3.0) == seconds


def restartable(port: int, *args: str) -> ServerProcess:
    return ServerProcess(*args, env={"REDIS_URL": REDIS_URL}, port=port)


@pytest.mark.backends("redis")
async def test_events_resume_after_a_server_is_killed_and_started_again_without_loss_or_duplicate(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    wf, port = new_workflow(), free_port()
    servers = [restartable(port, "--retry-ms", "100")]
    got: list[str] = []
    some = asyncio.Event()
    try:
        await servers[0].start()
        async with connect(REDIS_URL) as publisher:
            ids = [await publisher.publish(wf, started(f"a{i}")) for i in range(5)]

            async def read() -> None:
                async with WorkflowClient(servers[0].url, jitter=0) as client:
                    async for msg in client.events(wf):
                        assert isinstance(msg, Event)
                        got.append(msg.id)
                        if len(got) == 5:
                            some.set()

            reader = asyncio.create_task(read())
            await asyncio.wait_for(some.wait(), 10)
            servers[0].stop()  # SIGKILL: no goodbye on the stream
            ids += [await publisher.publish(wf, started(f"b{i}")) for i in range(5)]  # meanwhile
            servers.append(restartable(port, "--retry-ms", "100"))
            await servers[1].start()
            ids += [await publisher.publish(wf, started(f"c{i}")) for i in range(5)]
            ids.append(await publisher.publish(wf, DONE))
            await asyncio.wait_for(reader, 20)
    finally:
        for server in servers:
            server.stop()
    assert got == ids


@pytest.mark.backends("redis")
async def test_reconnects_wait_the_servers_retry_not_the_default(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    wf = new_workflow()
    server = restartable(free_port(), "--retry-ms", "300")
    trace = Requests()
    try:
        await server.start()
        ids = await publish(server.url, wf, [started("a")])
        async with (
            aiohttp.ClientSession(trace_configs=[trace.config]) as session,
            WorkflowClient(server.url, session=session, jitter=0) as client,
        ):
            first = asyncio.Event()

            async def read() -> None:
                async for msg in client.events(wf):
                    assert isinstance(msg, Event) and msg.id == ids[0]
                    first.set()

            reader = asyncio.create_task(read())
            await asyncio.wait_for(first.wait(), 10)
            server.stop()
            await trace.until(lambda seen: len(seen) >= 4)
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
    finally:
        server.stop()
    retries = trace.seen[1:4]  # after the first, 200, stream
    assert all(r["status"] == "error" for r in retries)
    assert all(r["headers"]["Last-Event-ID"] == ids[0] for r in retries)
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(retries)]
    assert all(0.29 <= g < 1.5 for g in gaps), gaps  # 300 ms, not the 3000 ms default
