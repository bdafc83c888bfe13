"""Loop stall of a 4 MiB, 10,000-node plan POST: the longest gap a 1 ms ticker sees.

The server runs in this process (aiohttp's TestServer over a real socket, real Redis, the
production GC settings), so a task that sleeps 1 ms in a loop measures the event loop
itself: its longest gap while the POST is in flight is the longest time the request held
the loop. The POST comes from `curl` in another process, so that sending 4 MiB is not on
this loop too. `--stages` also times each step of the publish path on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from server import models, progress, store
from server.__main__ import GC_THRESHOLDS
from server.app import create_app
from server.progress import parts
from server.publisher import Publisher
from server.settings import Settings
from testing.cleanup import forget

NODES = 10_000  # the SPEC's maximum plan
BODY_BYTES = 4 * 1024 * 1024 - 64 * 1024  # just under the default MAX_BODY_BYTES


def plan_body(nodes: int = NODES, target: int = BODY_BYTES) -> bytes:
    """A valid plan of `nodes` nodes (each depending on up to 8 before it, Unicode names),
    padded to about `target` bytes of JSON."""

    def body(pad: int) -> bytes:
        plan = [
            {
                "node_id": f"node-{i:05d}",
                "node_name": f"품질 판정 {i} " + "x" * pad,
                "node_type": f"type-{i % 40}",
                "depends_on": [f"node-{j:05d}" for j in range(max(0, i - 8), i)],
            }
            for i in range(nodes)
        ]
        doc = {"event_type": "workflow_planned", "definition_id": "bench", "nodes": plan}
        return json.dumps(doc, ensure_ascii=False).encode()

    bare = len(body(0))
    return body(max(0, min(1000, (target - bare) // nodes)))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def stages(body: bytes) -> None:
    """Each step of the publish path on its own (ms, best of 3)."""

    def best(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    raw = models.decode_body(body)
    publisher = Publisher(store.Store(Redis(), maxlen=10_000, retention_seconds=60))
    events = publisher.validate("bench", [raw], batch=False, size=len(body), text_checked=True)
    folded = parts.fold_parts(progress.new_state(), events, {}, None)
    rows = [
        ("decode_body (nesting scan, UTF-8, JSON)", best(lambda: models.decode_body(body))),
        ("json.loads alone", best(lambda: json.loads(body))),
        (
            "validate (pydantic + DAG check)",
            best(
                lambda: publisher.validate(
                    "bench", [raw], batch=False, size=len(body), text_checked=True
                )
            ),
        ),
        ("to_json (stored form)", best(lambda: models.to_json(events[0]))),
        (
            "fold and parts (worker thread)",
            best(lambda: parts.fold_parts(progress.new_state(), events, {}, None)),
        ),
    ]
    print(f"progress-hash fields to set: {len(folded[3]) // 2}")
    for name, seconds in rows:
        print(f"  {name:<42} {_ms(seconds):>7} ms")


async def longest_gap(until: asyncio.Event) -> float:
    """The longest gap between the ticks of a 1 ms ticker, until `until` is set."""
    longest = 0.0
    last = time.perf_counter()
    while not until.is_set():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        longest = max(longest, now - last)
        last = now
    return longest


async def loop_stalls(body: bytes, rounds: int, redis_url: str) -> list[tuple[float, float, int]]:
    """Per round: the POST's round trip, the longest gap of a 1 ms ticker meanwhile, and how
    many full collections ran in it."""
    redis = Redis.from_url(redis_url)
    app = create_app(Settings(), redis=redis)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    # As `python -m server` does after startup (server.__main__._tune_gc).
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    full = [0]

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            full[0] += 1

    gc.callbacks.append(count)
    base = str(server.make_url("")).rstrip("/")
    workflows: list[str] = []
    results: list[tuple[float, float, int]] = []
    try:
        with tempfile.NamedTemporaryFile(suffix=".json") as file:
            file.write(body)
            file.flush()
            for _ in range(rounds + 1):  # the first round warms up (script load, imports)
                wf = f"bench-plan-{uuid.uuid4().hex[:8]}"
                workflows.append(wf)
                posted = asyncio.Event()
                ticker = asyncio.create_task(longest_gap(posted))
                await asyncio.sleep(0.05)
                full[0] = 0
                started = time.perf_counter()
                curl = await asyncio.create_subprocess_exec(
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "-H",
                    "Content-Type: application/json",
                    "-H",
                    "Expect:",
                    "--data-binary",
                    f"@{file.name}",
                    f"{base}/workflows/{wf}/events",
                    stdout=asyncio.subprocess.PIPE,
                )
                status, _ = await curl.communicate()
                took = time.perf_counter() - started
                assert status == b"201", status
                await asyncio.sleep(0.05)  # what follows the answer (the hub's frame) too
                posted.set()
                results.append((took, await ticker, full[0]))
    finally:
        gc.callbacks.remove(count)
        await forget(redis, workflows)
        await server.close()
        await redis.aclose()
    return results[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--stages", action="store_true", help="time each step on its own")
    args = parser.parse_args()
    body = plan_body()
    print(f"body: {len(body):,} bytes, {NODES:,} nodes")
    if args.stages:
        stages(body)
    results = asyncio.run(loop_stalls(body, args.rounds, args.redis_url))
    posts = [took for took, _, _ in results]
    gaps = [gap for _, gap, _ in results]
    print(f"rounds: {len(results)}, full collections in them: {sum(n for *_, n in results)}")
    print(f"POST round trip ms: median {_ms(statistics.median(posts))}, max {_ms(max(posts))}")
    print(
        f"longest loop stall ms: median {_ms(statistics.median(gaps))}, "
        f"max {_ms(max(gaps))}, all {sorted(round(g * 1000, 1) for g in gaps)}"
    )
    clean = [gap for _, gap, full in results if not full]
    if clean and len(clean) < len(results):
        print(
            f"  rounds without a full collection: median {_ms(statistics.median(clean))},"
            f" max {_ms(max(clean))}"
        )


if __name__ == "__main__":
    main()
