"""`GET /workflows` latency at 10,000 and 100,000 known runs, and the live overview's delay.

    python -m bench.run_list                          # 10,000 and 100,000 runs
    python -m bench.run_list --runs 10000 --overview-runs 1000 --overview-seconds 20

For each --runs N: N runs are stored through the real write path (the in-process
publisher, which writes the run index as the server does): a plan of 3 nodes of one of 20
definitions, RUNNING, and for all but --running-share of them the nodes' completions and
COMPLETED. Then one server process (`python -m server`) answers, one request at a time,
--requests GETs of each kind: the first page (limit 50), a state filter (RUNNING), a
definition filter, and pages deep in a walk (following `next`); p50/p99 client-side.

The overview: --overview-runs runs are started (20-node plans), an overview stream is
opened, and each run gets one node_completed a second (one event per POST, spread evenly
over the second, over --overview-lanes keep-alive connections), for --overview-seconds.
Each `run` frame's delay is its arrival minus the summary's updated_at (the server's
receipt of the event, the same clock); the POSTs' own latency is reported too, and
--no-stream posts the same with no overview open (the cost of the overview). Every key
made is deleted afterwards, index entries included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

from server import redis_keys
from server.client.sse import EventStreamParser
from server.publisher import assemble
from server.settings import Settings

from . import publish_path
from .fanout import free_port
from .loadgen import HttpConn, raise_nofile

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
DEFINITIONS = 20  # the seeded runs' definition ids: <tag>-def-0 ... <tag>-def-19


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def seed(redis_url: str, tag: str, n: int, running_share: float) -> list[str]:
    """Store n runs through the publisher; returns the ids."""
    redis = Redis.from_url(redis_url)
    publisher = assemble(Settings(redis_url=redis_url), redis).publisher
    ids = [f"{tag}-{i}" for i in range(n)]
    running_every = max(1, round(1 / running_share)) if running_share > 0 else 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            events: list[dict[str, Any]] = [
                {
                    "event_type": "workflow_planned",
                    "definition_id": f"{tag}-def-{i % DEFINITIONS}",
                    "nodes": [{"node_id": f"n{k}"} for k in range(3)],
                },
                {"event_type": "workflow_state_changed", "to_state": "RUNNING"},
            ]
            if not (running_every and i % running_every == 0):
                events += [
                    {"event_type": "node_completed", "node_id": f"n{k}", "duration_ms": 100}
                    for k in range(3)
                ]
                events.append({"event_type": "workflow_state_changed", "to_state": "COMPLETED"})
            await publisher.publish_many(ids[i], events)

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(32)))
    print(f"  seeded {n} runs in {time.monotonic() - started:.1f} s", file=sys.stderr)
    await redis.aclose()
    return ids


async def cleanup(redis_url: str, tag: str) -> None:
    """The run's workflow keys and index entries (as publish_path does), and its history."""
    await publish_path.cleanup(redis_url, tag)
    redis = Redis.from_url(redis_url)
    try:
        # History keys name a hash of the definition id, never the id: no pattern finds them.
        defined = [redis_keys.history_definition_key(f"{tag}-def-{d}") for d in range(DEFINITIONS)]
        await redis.delete(*defined, *(redis_keys.history_recent_key(k) for k in defined))
    finally:
        await redis.aclose()


class Server:
    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.port = free_port()
        self.log = tempfile.TemporaryFile()
        self.proc: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> Server:
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PORT", "WORKERS")}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server",
                "--redis-url",
                self.redis_url,
                "--port",
                str(self.port),
            ],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=raise_nofile,
        )
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as s:
            while True:
                try:
                    async with s.get(f"{self.base}/healthz") as resp:
                        if resp.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.log.seek(0)
                    raise RuntimeError(self.log.read().decode(errors="replace")[-2000:])
                await asyncio.sleep(0.1)

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        await asyncio.to_thread(self.proc.wait, 10)
        self.log.close()


async def timed_gets(
    s: aiohttp.ClientSession, base: str, query: dict[str, str], count: int
) -> tuple[list[float], int]:
    times: list[float] = []
    listed = 0
    for _ in range(count):
        started = time.perf_counter()
        async with s.get(f"{base}/workflows", params=query) as resp:
            body = await resp.json()
            assert resp.status == 200, body
        times.append((time.perf_counter() - started) * 1000)
        listed = len(body["workflows"])
    return times, listed


async def deep_pages(s: aiohttp.ClientSession, base: str, count: int) -> list[float]:
    """Pages of one walk from its start, each timed (the first page not counted)."""
    times: list[float] = []
    params = {"limit": "50"}
    async with s.get(f"{base}/workflows", params=params) as resp:
        body = await resp.json()
    while body["next"] and len(times) < count:
        params["cursor"] = body["next"]
        started = time.perf_counter()
        async with s.get(f"{base}/workflows", params=params) as resp:
            body = await resp.json()
            assert resp.status == 200, body
        times.append((time.perf_counter() - started) * 1000)
    return times


async def list_latency(args: argparse.Namespace, n: int) -> list[dict[str, Any]]:
    tag = f"bench-rl-{uuid.uuid4().hex[:6]}"
    rows: list[dict[str, Any]] = []
    try:
        await seed(args.redis_url, tag, n, args.running_share)
        async with Server(args.redis_url) as srv, aiohttp.ClientSession() as s:
            kinds = {
                "first page": {"limit": "50"},
                "state=RUNNING": {"limit": "50", "state": "RUNNING"},
                "definition_id": {"limit": "50", "definition_id": f"{tag}-def-3"},
            }
            await timed_gets(s, srv.base, {"limit": "50"}, 5)  # warm up
            for kind, query in kinds.items():
                times, listed = await timed_gets(s, srv.base, query, args.requests)
                rows.append(_row(n, kind, times, listed))
            times = await deep_pages(s, srv.base, args.requests)
            rows.append(_row(n, "walk pages (cursor)", times, 50))
    finally:
        await cleanup(args.redis_url, tag)
    return rows


def _row(n: int, kind: str, times: list[float], listed: int) -> dict[str, Any]:
    return {
        "runs": n,
        "request": kind,
        "count": len(times),
        "listed": listed,
        "p50_ms": round(statistics.median(times), 2),
        "p99_ms": round(pct(times, 0.99), 2),
    }


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def overview_delay(args: argparse.Namespace) -> dict[str, Any]:
    tag = f"bench-ov-{uuid.uuid4().hex[:6]}"
    n, seconds = args.overview_runs, args.overview_seconds
    ids = [f"{tag}-{i}" for i in range(n)]
    delays: list[float] = []
    post_ms: list[float] = []
    frames = 0
    try:
        async with Server(args.redis_url) as srv, aiohttp.ClientSession() as s:
            plan = {
                "event_type": "workflow_planned",
                "definition_id": f"{tag}-def",
                "nodes": [{"node_id": f"n{k}"} for k in range(20)],
            }
            for w in ids:
                body = [plan, {"event_type": "workflow_state_changed", "to_state": "RUNNING"}]
                async with s.post(f"{srv.base}/workflows/{w}/events", json=body) as resp:
                    assert resp.status == 201
            loop = asyncio.get_running_loop()
            conns = []
            for _ in range(args.overview_lanes):
                _t, conn = await loop.create_connection(HttpConn, HOST, srv.port)
                conns.append(conn)
            stop = asyncio.Event()

            async def read() -> None:
                nonlocal frames
                headers = {"Accept": "text/event-stream"}
                async with s.get(f"{srv.base}/workflows", headers=headers) as resp:
                    first = True
                    parser = EventStreamParser()  # one stream: its parsing cost is nothing
                    async for chunk in resp.content.iter_any():
                        for frame in parser.feed(chunk):
                            summary = json.loads(frame.data)
                            if not first or summary["completed_nodes"] > 0:
                                frames += 1
                                if summary["updated_at"] and summary["completed_nodes"] > 0:
                                    delays.append(time.time() - _parse_time(summary["updated_at"]))
                        if stop.is_set():
                            return

            reader = asyncio.create_task(read() if not args.no_stream else asyncio.sleep(0))
            await asyncio.sleep(1.0)  # the first page is out
            posted = 0

            async def lane(k: int) -> None:
                nonlocal posted
                conn = conns[k]
                mine = ids[k :: args.overview_lanes]
                start = time.monotonic()
                for second in range(seconds):
                    for j, w in enumerate(mine):
                        due = start + second + j / len(mine)
                        wait = due - time.monotonic()
                        if wait > 0:
                            await asyncio.sleep(wait)
                        event = {"event_type": "node_completed", "node_id": f"n{second % 20}"}
                        body = json.dumps(event).encode()
                        req = (
                            f"POST /workflows/{w}/events HTTP/1.1\r\nHost: {HOST}\r\n"
                            "Content-Type: application/json\r\n"
                            f"Content-Length: {len(body)}\r\n\r\n"
                        ).encode() + body
                        sent = time.perf_counter()
                        status, _ = await conn.request(req)
                        post_ms.append(1000 * (time.perf_counter() - sent))
                        assert status == 201
                        posted += 1

            started = time.monotonic()
            await asyncio.gather(*(lane(k) for k in range(args.overview_lanes)))
            took = time.monotonic() - started
            await asyncio.sleep(1.0)  # the last frames
            stop.set()
            reader.cancel()
            for conn in conns:
                conn.close()
    finally:
        await cleanup(args.redis_url, tag)
    return {
        "runs": n,
        "seconds": seconds,
        "events_posted": posted,
        "events_per_s": round(posted / took, 1),
        "post_p50_ms": round(statistics.median(post_ms), 1) if post_ms else None,
        "post_p99_ms": round(pct(post_ms, 0.99), 1) if post_ms else None,
        "frames": frames,
        "delay_p50_ms": round(1000 * statistics.median(delays), 1) if delays else None,
        "delay_p99_ms": round(1000 * pct(delays, 0.99), 1) if delays else None,
        "delay_max_ms": round(1000 * max(delays), 1) if delays else None,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--runs", default="10000,100000", help="comma-separated run counts")
    p.add_argument("--running-share", type=float, default=0.05)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--overview-runs", type=int, default=1000)
    p.add_argument("--overview-seconds", type=int, default=20)
    p.add_argument("--overview-lanes", type=int, default=64, help="keep-alive POST lanes")
    p.add_argument("--no-overview", action="store_true")
    p.add_argument("--no-stream", action="store_true", help="post, but open no overview stream")
    return p.parse_args(argv)


async def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows: list[dict[str, Any]] = []
    for n in [int(x) for x in args.runs.split(",") if x]:
        rows += await list_latency(args, n)
    print("| runs | request | requests | listed | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['runs']:,} | {r['request']} | {r['count']} | {r['listed']} "
            f"| {r['p50_ms']} | {r['p99_ms']} |"
        )
    if not args.no_overview:
        ov = await overview_delay(args)
        print()
        print(
            "| runs | events/s | POST p50/p99 ms | frames | delay p50 ms | delay p99 ms | max ms |"
        )
        print("|---|---|---|---|---|---|---|")
        print(
            f"| {ov['runs']:,} | {ov['events_per_s']} | {ov['post_p50_ms']} / {ov['post_p99_ms']} "
            f"| {ov['frames']} | {ov['delay_p50_ms']} | {ov['delay_p99_ms']} "
            f"| {ov['delay_max_ms']} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
