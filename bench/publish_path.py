"""Server CPU per published event: `POST /workflows/{id}/events` against a real Redis.

Starts `python -m server --redis-url URL --port P` (one process, a free loopback port) for
each variant, publishes a small plan to each of --workflows workflows, then POSTs
--events events (node_started / node_completed, round robin over the workflows and over
the plan's nodes) over --connections keep-alive connections, paced at --rate events/s
(0: as fast as the connections go), with a hard cap of --max-seconds. It reports the
server's CPU seconds (utime + stime from /proc/<pid>/stat) per 1,000 events stored and
the client-side POST latency (p50/p99, from the moment a POST was due, so queueing in the
client counts). `--batch` sends --batch-size events per POST (one JSON array) instead.

Variants compare builds or settings in one run, interleaved round by round:

    python -m bench.publish_path                                   # this checkout
    python -m bench.publish_path --batch
    python -m bench.publish_path --variant old=/tmp/old --variant new=.
    python -m bench.publish_path --variant "log=. --access-log 1" --variant "nolog=. --access-log 0"

A variant is `LABEL=DIR [server flags...]`: the server is run from DIR (its `server`
package first on sys.path). The client is a minimal HTTP/1.1 keep-alive client on asyncio
Protocols, so that it takes as little of the shared two cores as it can. Every key the run
created (`wf:{<id>}:*`) is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from server import redis_keys
from server.overview import runs

from .fanout import finish_profiler, free_port, start_profiler
from .loadgen import HttpConn, cpu_seconds, process_tree, raise_nofile

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PLAN_NODES = 10


# ---------------------------------------------------------------------------------------
# Requests (sent with loadgen's minimal keep-alive client, HttpConn)


def post_bytes(port: int, workflow_id: str, body: bytes) -> bytes:
    return (
        f"POST /workflows/{workflow_id}/events HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


# ---------------------------------------------------------------------------------------
# Events


def plan_event() -> dict[str, Any]:
    nodes = [
        {
            "node_id": f"n{i}",
            "node_name": f"단계 {i}",
            "node_type": "step",
            "depends_on": [f"n{i - 1}"] if i else [],
        }
        for i in range(PLAN_NODES)
    ]
    return {"event_type": "workflow_planned", "nodes": nodes, "definition_id": "bench-def"}


def node_event(k: int) -> dict[str, Any]:
    """The k-th event of a workflow: node n(k/2 mod N) starts, then completes."""
    node = f"n{(k // 2) % PLAN_NODES}"
    if k % 2 == 0:
        return {
            "event_type": "node_started",
            "node_id": node,
            "node_name": "이상 탐지",
            "node_type": "step",
        }
    return {"event_type": "node_completed", "node_id": node, "duration_ms": 1200 + k % 7}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------
# One run against one server


@dataclass
class Variant:
    label: str
    directory: Path
    server_args: list[str]

    @classmethod
    def parse(cls, spec: str) -> Variant:
        label, _, rest = spec.partition("=")
        if not rest:
            raise argparse.ArgumentTypeError(f"a variant is LABEL=DIR [flags...], got {spec!r}")
        parts = shlex.split(rest)
        return cls(label, Path(parts[0]).resolve(), parts[1:])


@dataclass
class Result:
    events: int = 0
    posts: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0

    def cpu_ms_per_1000(self) -> float:
        return self.cpu_s * 1000 / self.events * 1000 if self.events else float("nan")

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(q * (len(data) - 1) + 0.5))] * 1000


@contextlib.asynccontextmanager
async def server(variant: Variant, args: argparse.Namespace) -> AsyncIterator[tuple[int, int]]:
    """Run the variant's server; yields (pid, port); always stops it."""
    port = free_port()
    log = tempfile.TemporaryFile()
    env = {**os.environ, "PYTHONPATH": str(variant.directory)}
    for name in ("REDIS_URL", "PORT", "ACCESS_LOG", "PUBLISH_TOKEN", "WORKERS"):
        env.pop(name, None)
    argv = [
        sys.executable,
        "-m",
        "server",
        "--redis-url",
        args.redis_url,
        "--port",
        str(port),
        *variant.server_args,
    ]
    proc = subprocess.Popen(
        argv,
        cwd=variant.directory,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=raise_nofile,
    )
    try:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"{variant.label}: server exited:\n{tail}")
            try:
                _t, conn = await loop.create_connection(HttpConn, HOST, port)
                status, _ = await conn.request(
                    f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
                )
                conn.close()
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{variant.label}: server did not answer in 30 s")
            await asyncio.sleep(0.1)
        yield proc.pid, port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), 10)
        except TimeoutError:
            proc.kill()
            await asyncio.to_thread(proc.wait)
        log.close()


async def run_once(variant: Variant, args: argparse.Namespace, profile: str | None) -> Result:
    tag = f"bench-pp-{uuid.uuid4().hex[:8]}"
    workflows = [f"{tag}-{i}" for i in range(args.workflows)]
    try:
        async with server(variant, args) as (pid, port):
            return await drive(pid, port, workflows, args, profile)
    finally:
        await cleanup(args.redis_url, tag)


async def drive(
    pid: int, port: int, workflows: list[str], args: argparse.Namespace, profile: str | None
) -> Result:
    loop = asyncio.get_running_loop()
    conns: asyncio.Queue[HttpConn] = asyncio.Queue()
    opened: list[HttpConn] = []
    for _ in range(args.connections):
        _t, conn = await loop.create_connection(HttpConn, HOST, port)
        opened.append(conn)
        conns.put_nowait(conn)
    result = Result()

    async def post(workflow_id: str, body: bytes, due: float, count: int, timed: bool) -> None:
        conn = await conns.get()
        try:
            status, answer = await asyncio.wait_for(
                conn.request(post_bytes(port, workflow_id, body)), 30
            )
        except (OSError, TimeoutError, ConnectionError) as exc:
            status, answer = 0, str(exc).encode()
            conn.close()
            _t, conn = await loop.create_connection(HttpConn, HOST, port)
            opened.append(conn)
        conns.put_nowait(conn)
        if not timed:
            if status != 201:
                raise RuntimeError(f"setup POST failed: {status} {answer[:200]!r}")
            return
        result.posts += 1
        if status == 201:
            result.events += count
            result.latencies.append(time.perf_counter() - due)
        else:
            result.errors += 1
            if len(result.error_samples) < 5:
                result.error_samples.append(f"{status} {answer[:160]!r}")

    # Setup (not measured): a plan per workflow, and warm every connection.
    plan = dumps(plan_event())
    for i in range(0, len(workflows), 200):
        chunk = workflows[i : i + 200]
        await asyncio.gather(*(post(wf, plan, 0.0, 1, False) for wf in chunk))

    # The measured phase: posts[j] = (workflow, body, events in it).
    per_post = args.batch_size if args.batch else 1
    n_posts = max(1, args.events // per_post)
    seq = [0] * len(workflows)
    bodies: list[tuple[str, bytes, int]] = []
    for j in range(n_posts):
        w = j % len(workflows)
        wf = workflows[w]
        if args.batch:
            items = [node_event(seq[w] + i) for i in range(per_post)]
            seq[w] += per_post
            bodies.append((wf, dumps(items), per_post))
        else:
            bodies.append((wf, dumps(node_event(seq[w])), 1))
            seq[w] += 1
    interval = per_post / args.rate if args.rate > 0 else 0.0
    spy = start_profiler(pid, args.profile_seconds, profile) if profile else None
    pids = process_tree(pid)
    cpu0, t0 = cpu_seconds(pids), time.perf_counter()
    deadline = t0 + args.max_seconds
    tasks: set[asyncio.Task[None]] = set()
    # One workflow never has two POSTs in flight: its events stay in order.
    busy: dict[str, asyncio.Task[None]] = {}
    for j, (wf, body, count) in enumerate(bodies):
        due = t0 + j * interval
        now = time.perf_counter()
        if now > deadline:
            break
        if interval and due > now:
            await asyncio.sleep(due - now)
        elif not interval:
            due = now
            while conns.empty() and len(tasks) >= args.connections:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        before = busy.get(wf)
        if before is not None and not before.done():
            await before
        task = asyncio.create_task(post(wf, body, due, count, True))
        busy[wf] = task
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=max(1.0, deadline + 30 - time.perf_counter()))
    result.wall_s = time.perf_counter() - t0
    result.cpu_s = cpu_seconds(pids) - cpu0
    if spy is not None and profile:
        finish_profiler(spy, profile)
    for conn in opened:
        conn.close()
    return result


async def cleanup(redis_url: str, tag: str) -> None:
    """Delete every key of this run's workflows: `wf:{<tag>-<i>}:*`, and their entries in
    the run index."""
    redis = Redis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        workflows: set[str] = set()
        async for key in redis.scan_iter(
            match=redis_keys.workflow_keys_match(f"{tag}-*"), count=1000
        ):
            batch.append(key)
            workflows.add(key.decode().split("{", 1)[1].split("}", 1)[0])
            if len(batch) >= 500:
                await redis.delete(*batch)
                batch.clear()
        if batch:
            await redis.delete(*batch)
        if workflows:
            await runs.RunIndex(redis, retention_seconds=1).forget(sorted(workflows))
    finally:
        await redis.aclose()


# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument(
        "--variant",
        action="append",
        type=Variant.parse,
        default=[],
        help="LABEL=DIR [server flags...]; repeat to compare (default: this repo)",
    )
    p.add_argument("--workflows", type=int, default=1000)
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument(
        "--rate",
        type=float,
        default=1000.0,
        help="events/s offered (0: as fast as the connections go)",
    )
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--batch", action="store_true", help="--batch-size events per POST")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--rounds", type=int, default=1, help="runs per variant, interleaved")
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--profile", help="py-spy raw profile of the first variant's first run")
    p.add_argument("--profile-seconds", type=float, default=8.0)
    p.add_argument("--json", help="also write every run's figures here")
    args = p.parse_args(argv)
    if not args.variant:
        args.variant = [Variant("this", REPO, [])]
    return args


async def main_async(args: argparse.Namespace) -> int:
    raise_nofile()
    runs: dict[str, list[Result]] = {v.label: [] for v in args.variant}
    for r in range(args.rounds):
        for i, variant in enumerate(args.variant):
            profile = args.profile if (r == 0 and i == 0) else None
            res = await run_once(variant, args, profile)
            runs[variant.label].append(res)
            print(
                f"round {r + 1} {variant.label}: {res.events} events in {res.wall_s:.1f} s, "
                f"server {res.cpu_ms_per_1000():.0f} ms CPU/1000 events, "
                f"p50 {res.pct(0.5):.2f} ms p99 {res.pct(0.99):.2f} ms, "
                f"errors {res.errors} {res.error_samples[:2]}",
                flush=True,
            )
    mode = f"batch of {args.batch_size}" if args.batch else "single event"
    print(
        f"\nPOST /workflows/{{id}}/events, {mode} per POST, {args.workflows} workflows, "
        f"{args.events} events per run at {args.rate:g} events/s offered, "
        f"{args.connections} connections, {args.rounds} round(s); median over rounds\n"
    )
    base = statistics.median(r.cpu_ms_per_1000() for r in runs[args.variant[0].label])
    print(
        "| variant | events | server CPU ms / 1,000 events | vs first | server CPU % "
        "| p50 ms | p99 ms | errors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, results in runs.items():
        cpu = statistics.median(r.cpu_ms_per_1000() for r in results)
        pct = statistics.median(100 * r.cpu_s / r.wall_s for r in results)
        p50 = statistics.median(r.pct(0.5) for r in results)
        p99 = statistics.median(r.pct(0.99) for r in results)
        events = statistics.median(r.events for r in results)
        errors = sum(r.errors for r in results)
        print(
            f"| {label} | {events:,.0f} | {cpu:.0f} | {cpu / base:.2f} | {pct:.0f} "
            f"| {p50:.2f} | {p99:.2f} | {errors} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    label: [
                        {
                            "events": r.events,
                            "cpu_s": r.cpu_s,
                            "wall_s": r.wall_s,
                            "cpu_ms_per_1000": r.cpu_ms_per_1000(),
                            "p50_ms": r.pct(0.5),
                            "p99_ms": r.pct(0.99),
                            "errors": r.errors,
                        }
                        for r in results
                    ]
                    for label, results in runs.items()
                },
                indent=1,
            )
        )
    return 1 if any(r.errors for rs in runs.values() for r in rs) else 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
