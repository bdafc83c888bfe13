"""CPU the hub spends per live event in one process: read off the pub/sub connection,
framed, pushed to a channel's ring (one notify-only reader, so no socket writes).

Every worker of `--workers N` pays this for every event of every workflow it carries, so it
is the part of the cost that a second worker adds. Another process PUBLISHes the messages
(pipelined), so the figure is the hub's alone. `--batch` events go in one message, in
either format the hub reads: `blocks`, the SSE frames ready (what the append script
publishes), or `lines`, one `<id> <type> <terminal> <json>` line per event (what it
published before, and what the overview notices still are).

    python -m bench.hub_cost --messages 100000 --runs 3
    python -m bench.hub_cost --messages 2000 --batch 100 --runs 3
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
channel, n, batch, kind = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
data = json.dumps({"event_type": "node_progress", "workflow_id": "hub-cost",
                   "timestamp": "2026-12-02T10:00:00.000Z", "node_id": "n1",
                   "fraction": 0.5, "message": "0 12345 1733130000.123"})
def message(i):
    ids = [f"1733130000000-{j}" for j in range(i * batch, (i + 1) * batch)]
    if kind == "lines":
        return "\\n".join(f"{e} node_progress 0 {data}" for e in ids)
    frames = "".join(f"id: {e}\\nevent: node_progress\\ndata: {data}\\n\\n" for e in ids)
    return f"#{ids[0]} {ids[-1]} {batch} 0\\n{frames}"
pipe = r.pipeline(transaction=False)
for i in range(n):
    pipe.publish(channel, message(i))
    if i % 1000 == 999:
        pipe.execute()
pipe.execute()
r.publish(channel, "1733130009999-0 workflow_state_changed 1 {}")
"""


async def one_run(url: str, messages: int, batch: int, kind: str) -> float:
    """Microseconds of this process's CPU per event received."""
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
        args = [url, redis_keys.channel(wf), str(messages), str(batch), kind]
        proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, *args])
        async with asyncio.timeout(120):
            while chan.terminal_seq < 0:
                sub.cursor = chan.seq
                await asyncio.sleep(0.001)
        cpu = time.process_time() - cpu0
        proc.wait(30)
        return 1e6 * cpu / (messages * batch + 1)
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
    p.add_argument("--batch", type=int, default=1, help="events per message")
    p.add_argument("--formats", default="blocks,lines", help="blocks, lines or both")
    args = p.parse_args()
    kinds = args.formats.split(",")
    results: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.runs):  # the formats alternate: the machine's speed drifts
        for kind in kinds:
            results[kind].append(
                asyncio.run(one_run(args.redis_url, args.messages, args.batch, kind))
            )
    print(f"{args.messages} messages of {args.batch} events, us CPU per event\n")
    print("| run | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds))
    for i in range(args.runs):
        print(f"| {i + 1} | " + " | ".join(f"{results[k][i]:.2f}" for k in kinds) + " |")
    medians = " | ".join(f"{statistics.median(results[k]):.2f}" for k in kinds)
    print(f"| median | {medians} |")


if __name__ == "__main__":
    main()
