"""Publish and poll cost against plan size: an append touches only its nodes' state."""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from redis.asyncio import Redis

from server import redis_keys
from server.publisher import assemble
from server.settings import Settings


async def measure(redis: Redis, nodes: int, events: int, polls: int) -> tuple[float, float]:
    _, tracker, publisher, index = assemble(Settings(), redis)
    wf = "bench-" + uuid.uuid4().hex[:8]
    plan = [{"node_id": f"n{i}", "node_type": "t"} for i in range(nodes)]
    try:
        await publisher.publish(wf, {"event_type": "workflow_planned", "nodes": plan})
        t0 = time.perf_counter()
        for i in range(events):
            await publisher.publish(wf, {"event_type": "node_started", "node_id": f"n{i % nodes}"})
        per_event = (time.perf_counter() - t0) / events * 1000
        t0 = time.perf_counter()
        for _ in range(polls):
            await tracker.snapshot(wf)
        per_poll = (time.perf_counter() - t0) / polls * 1000
        return per_event, per_poll
    finally:
        await redis.delete(*redis_keys.workflow_keys(wf))
        await index.forget([wf])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--polls", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="the 30-node plan only (tests)")
    args = parser.parse_args()
    redis = Redis.from_url(args.redis_url)
    print(f"{'plan nodes':>10} {'publish ms/event':>17} {'poll ms':>8}")
    for nodes in (30,) if args.smoke else (30, 1_000, 10_000):
        per_event, per_poll = await measure(redis, nodes, args.events, args.polls)
        print(f"{nodes:>10} {per_event:>17.2f} {per_poll:>8.2f}")
    await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
