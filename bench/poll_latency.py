"""Progress poll latency: a short history versus a long, trimmed one (should match)."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from server import app_keys, redis_keys
from server.app import create_app
from server.settings import Settings
from testing.cleanup import forget

NODES = 30


def batch(start: int, n: int) -> list[dict[str, Any]]:
    """node_progress events cycling over the plan's nodes."""
    return [
        {"event_type": "node_progress", "node_id": f"n{(start + i) % NODES}", "fraction": 0.5}
        for i in range(n)
    ]


async def fill(publisher: Any, wf: str, events: int) -> None:
    plan = {
        "event_type": "workflow_planned",
        "definition_id": "bench",
        "nodes": [{"node_id": f"n{i}", "node_type": "t"} for i in range(NODES)],
    }
    await publisher.publish(wf, plan)
    await publisher.publish(wf, {"event_type": "workflow_state_changed", "to_state": "RUNNING"})
    done = 2
    while done < events:
        n = min(1000, events - done)
        await publisher.publish_many(wf, batch(done, n))
        done += n


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--polls", type=int, default=2000)
    parser.add_argument("--smoke", action="store_true", help="a 1,000-event long run (tests)")
    args = parser.parse_args()
    long_events = 1_000 if args.smoke else 100_000
    redis = Redis.from_url(args.redis_url)
    app = create_app(Settings(), redis=redis)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    base = str(server.make_url("")).rstrip("/")
    short, long = f"bench-short-{uuid.uuid4().hex[:6]}", f"bench-long-{uuid.uuid4().hex[:6]}"
    try:
        publisher = app[app_keys.publisher_key]
        await fill(publisher, short, 100)
        await fill(publisher, long, long_events)
        lengths = {wf: await redis.xlen(redis_keys.stream_key(wf)) for wf in (short, long)}
        samples: dict[str, list[float]] = {short: [], long: []}
        async with aiohttp.ClientSession() as s:
            for i in range(args.polls):  # interleaved, so machine noise hits both alike
                wf = short if i % 2 else long
                t0 = time.perf_counter()
                async with s.get(f"{base}/workflows/{wf}/progress") as resp:
                    await resp.read()
                    assert resp.status == 200
                samples[wf].append((time.perf_counter() - t0) * 1000)
        print(f"{'workflow':<10} {'events':>8} {'retained':>9} {'p50 ms':>7} {'p99 ms':>7}")
        for name, wf, events in (("short", short, 100), ("long", long, long_events)):
            xs = sorted(samples[wf])
            p50, p99 = statistics.median(xs), xs[int(len(xs) * 0.99) - 1]
            print(f"{name:<10} {events:>8} {lengths[wf]:>9} {p50:>7.2f} {p99:>7.2f}")
        ratio = statistics.median(samples[long]) / statistics.median(samples[short])
        print(f"p50 long/short: {ratio:.2f}")
    finally:
        await forget(redis, [short, long])
        await server.close()
        await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
