"""A stalled reader while 20,000 events of 1 KiB go out: bounded RSS, nobody else waits, no loss."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError

from server import redis_keys
from testing.events import DONE
from testing.metrics import sample
from testing.procs import ServerProcess
from testing.raw_http import dechunk, open_stalled_reader, read_all
from testing.sse import Parser
from tests.conftest import REDIS_URL, REQUIRE_REDIS

N_EVENTS = 20_000
BATCH = 200  # events per POST
QUEUE_FRAMES = 256  # --client-queue-frames: the live queue of each stream
PAYLOAD = "x" * 1000  # with its envelope, each stored event is ~1.1 KiB of JSON
# Bound on RSS growth while the stalled reader holds its stream and every event goes out:
# one stream's live queue (QUEUE_FRAMES frames, ~0.3 MiB), one history page being written
# (500 events, ~0.6 MiB as bytes, a few MiB as Python objects), aiohttp's write buffer, the
# request being parsed (200 events, ~0.2 MiB) and allocator slack. Holding the events for the
# stalled reader instead would take 20,001 frames, ~22 MiB, on top of that.
RSS_BOUND_MIB = 12
# The other client may lag behind the publisher at most this many times more than it does
# with no stalled reader around (plus a little for a loaded machine).
LAG_RATIO = 4.0
LAG_SLACK_SECONDS = 0.5


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        m = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)
    assert m is not None
    return int(m.group(1))


@dataclass
class Follower:
    """A normal client: reads the stream as it comes and notes when each id arrived."""

    arrived: dict[str, float] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    done: float | None = None

    async def run(self, s: aiohttp.ClientSession, url: str) -> None:
        parser = Parser()
        async with s.get(url) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_any():
                now = time.monotonic()
                for msg in parser.feed(chunk):
                    if msg.id is not None:
                        self.ids.append(msg.id)
                        self.arrived[msg.id] = now
        self.done = time.monotonic()


@dataclass
class Run:
    ids: list[str]
    posted: list[tuple[str, float]]  # last id of each batch, when its POST was answered
    peak_kib: int


async def publish_all(s: aiohttp.ClientSession, base: str, wf: str, pid: int) -> Run:
    """POST N_EVENTS in batches, then the terminal; sample the server's RSS throughout."""
    ids: list[str] = []
    posted: list[tuple[str, float]] = []
    peak = rss_kib(pid)
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_kib(pid))
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    try:
        for b in range(N_EVENTS // BATCH):
            batch: list[dict[str, Any]] = [
                {
                    "event_type": "node_progress",
                    "node_id": f"n{(b * BATCH + i) % 50}",
                    "fraction": 0.5,
                    "message": PAYLOAD,
                }
                for i in range(BATCH)
            ]
            if b == N_EVENTS // BATCH - 1:
                batch.append(DONE)
            async with s.post(f"{base}/workflows/{wf}/events", json=batch) as resp:
                assert resp.status == 201, await resp.text()
                got = (await resp.json())["ids"]
            ids.extend(got)
            posted.append((got[-1], time.monotonic()))
    finally:
        stop.set()
        await sampler
    return Run(ids, posted, max(peak, rss_kib(pid)))


def max_lag(run: Run, follower: Follower) -> float:
    """The longest a batch waited between its publish being answered and the reader having it."""
    return max(follower.arrived[last] - at for last, at in run.posted)


async def metric(s: aiohttp.ClientSession, base: str, name: str) -> float:
    async with s.get(f"{base}/metrics") as resp:
        text = await resp.text()
    return sample(text, name) or 0.0


async def open_streams(s: aiohttp.ClientSession, base: str) -> float:
    async with s.get(f"{base}/metrics") as resp:
        text = await resp.text()
    return sample(text, "wfsse_open_streams", kind="events") or 0.0


async def wait_for_streams(s: aiohttp.ClientSession, base: str, n: int) -> None:
    async with asyncio.timeout(10):
        while await open_streams(s, base) < n:
            await asyncio.sleep(0.02)


async def real_redis() -> Redis | None:
    """The shared Redis keeps the stored history out of the server's RSS; else the embedded one."""
    client = Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (RedisError, OSError):
        await client.aclose()
        assert not REQUIRE_REDIS, f"REQUIRE_REDIS=1 but Redis at {REDIS_URL} does not answer"
        return None
    return client


async def test_stalled_reader_keeps_rss_bounded_and_another_client_is_not_delayed() -> None:
    redis = await real_redis()
    env = {"REDIS_URL": REDIS_URL} if redis is not None else {}
    server = ServerProcess(
        "--client-queue-frames",
        str(QUEUE_FRAMES),
        "--history-maxlen",
        str(N_EVENTS * 2),  # all retained: the stalled reader needs them
        env=env,
    )
    if redis is None:
        server.env.pop("REDIS_URL", None)
    tag = uuid.uuid4().hex[:8]
    control_wf, wf = f"mem-control-{tag}", f"mem-stalled-{tag}"
    stalled = None
    try:
        await server.start()
        assert server.proc is not None
        pid, base = server.proc.pid, server.url
        timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            # Control: the same load with one normal client and no stalled one.
            control = Follower()
            task = asyncio.create_task(control.run(s, f"{base}/workflows/{control_wf}/events"))
            await wait_for_streams(s, base, 1)
            control_before = rss_kib(pid)
            control_run = await publish_all(s, base, control_wf, pid)
            await asyncio.wait_for(task, 30)
            assert control.ids == control_run.ids

            # The run under test: a stalled reader and a normal one on the same workflow.
            stalled = await open_stalled_reader(base, f"/workflows/{wf}/events")
            follower = Follower()
            task = asyncio.create_task(follower.run(s, f"{base}/workflows/{wf}/events"))
            await wait_for_streams(s, base, 2)
            catchups = await metric(s, base, "wfsse_slow_client_catchups_total")
            before = rss_kib(pid)
            run = await publish_all(s, base, wf, pid)
            await asyncio.wait_for(task, 30)
            assert follower.done is not None
            # The stalled one has still not read a byte, and the server knows it fell behind.
            assert await open_streams(s, base) == 1
            assert await metric(s, base, "wfsse_slow_client_catchups_total") > catchups
            after = rss_kib(pid)

        lag, control_lag = max_lag(run, follower), max_lag(control_run, control)
        end_lag = follower.done - run.posted[-1][1]
        control_end_lag = control.done - control_run.posted[-1][1] if control.done else 0.0
        growth_mib = (run.peak_kib - before) / 1024
        # The embedded Redis keeps the 20,001 stored events in this very process: allow what
        # storing them cost in the control run. With a real Redis they live elsewhere.
        history_mib = 0.0 if redis is not None else (control_run.peak_kib - control_before) / 1024
        bound_mib = RSS_BOUND_MIB + history_mib
        print(
            f"\nRSS before {before / 1024:.1f} MiB, peak {run.peak_kib / 1024:.1f} MiB "
            f"(+{growth_mib:.1f} MiB, bound {bound_mib:.1f}), after {after / 1024:.1f} MiB; "
            f"max lag {lag * 1000:.0f} ms vs control {control_lag * 1000:.0f} ms; "
            f"end lag {end_lag * 1000:.0f} ms vs control {control_end_lag * 1000:.0f} ms; "
            f"backend {'redis' if redis is not None else 'embedded'}"
        )
        assert growth_mib < bound_mib
        # Every event reached the normal client, in order, without waiting for the stalled one.
        assert follower.ids == run.ids and len(run.ids) == N_EVENTS + 1
        assert lag <= LAG_RATIO * control_lag + LAG_SLACK_SECONDS
        assert end_lag <= LAG_RATIO * control_end_lag + LAG_SLACK_SECONDS

        # Now the stalled reader reads: every event exactly once, in order, then the end.
        raw = await read_all(stalled, timeout=60)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0]
        # Fed in slices: the test parser rescans its buffer per line (quadratic on 24 MB at once).
        stream, parser = dechunk(body), Parser()
        messages = [
            m
            for i in range(0, len(stream), 1 << 14)
            for m in parser.feed(stream[i : i + (1 << 14)])
        ]
        assert [m.id for m in messages if m.id] == run.ids
        assert messages[-1].event == "workflow_state_changed"
    finally:
        if stalled is not None:
            stalled.close()
        server.stop()
        if redis is not None:
            await redis.delete(*redis_keys.workflow_keys(wf), *redis_keys.workflow_keys(control_wf))
            await redis.aclose()
