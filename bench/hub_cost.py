"""CPU the hub spends per live message in one process: read off the pub/sub connection,
framed, pushed to a channel's ring (one notify-only reader, so no socket writes).

Every worker of `--workers N` pays this for every event of every workflow it carries, so it
is the part of the cost that a second worker adds. Another process PUBLISHes the messages
(pipelined), so the figure is the hub's alone.

    python -m bench.hub_cost --messages 100000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

from server import redis_keys
from server.fanout.hub import Hub
from server.redis_client import command_client

PUBLISHER = """
import json, sys, redis
r = redis.Redis.from_url(sys.argv[1])
channel, n = sys.argv[2], int(sys.argv[3])
data = json.dumps({"event_type": "node_progress", "workflow_id": "hub-cost",
                   "timestamp": "2026-12-02T10:00:00.000Z", "node_id": "n1",
                   "fraction": 0.5, "message": "0 12345 1733130000.123"})
pipe = r.pipeline(transaction=False)
for i in range(n):
    pipe.publish(channel, f"1733130000000-{i} node_progress 0 {data}")
    if i % 1000 == 999:
        pipe.execute()
pipe.execute()
r.publish(channel, "1733130009999-0 workflow_state_changed 1 {}")
"""


async def one_run(url: str, messages: int) -> float:
    """Microseconds of this process's CPU per message received."""
    redis = command_client(url)
    hub = Hub(redis, queue_limit=1024)
    await hub.start()
    wf = f"bench-hub-cost-{os.getpid()}-{time.monotonic_ns()}"
    sub = await hub.attach(wf)
    try:
        async with asyncio.timeout(10):
            while not sub.confirmed:
                await asyncio.sleep(0.01)
        sub.notify_only = True  # a progress stream: it holds no frames
        chan = sub.channel
        cpu0 = time.process_time()
        proc = subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, url, redis_keys.channel(wf), str(messages)]
        )
        async with asyncio.timeout(120):
            while chan.terminal_seq < 0:
                sub.cursor = chan.seq
                await asyncio.sleep(0.001)
        cpu = time.process_time() - cpu0
        proc.wait(30)
        return 1e6 * cpu / (messages + 1)
    finally:
        await hub.detach(sub)
        await hub.close()
        await redis.aclose()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    results = [asyncio.run(one_run(args.redis_url, args.messages)) for _ in range(args.runs)]
    print("| run | us CPU per message |\n|---|---|")
    for i, us in enumerate(results, 1):
        print(f"| {i} | {us:.2f} |")
    print(f"| median | {statistics.median(results):.2f} |")


if __name__ == "__main__":
    main()
