"""Fan-out scenarios of issue 6 against four systems in one run.

One file of ~1,300 lines: a benchmark is read and run as one program; its scenarios
share the systems' start-up, the generator and the tables, and RESULTS.md cites it by
name. The load generator and the baselines are modules of their own.

Systems (each started fresh for every scenario and size, on a free loopback port):
  ours   python -m server --redis-url URL --port P
  seed   bench/baselines/seed_style.py: one Redis pub/sub connection per stream
  bare   bench/baselines/bare_hub.py: one subscription per process, encode once, nothing else
  nchan  nginx + Nchan (Debian's libnginx-mod-nchan), bench/baselines/nchan.conf

Scenarios:
  S1  idle N streams on one workflow (N = --s1-sizes): all established? RSS growth per
      stream after the first event; the Redis clients of the server (pub/sub vs normal).
  S2  --s2-streams streams on one workflow, --s2-rates events/s for --duration s.
  S3  --s3-workflows workflows x 2 streams, 1 event/s each, for --duration s.
  S4  --s4-streams streams on one workflow, publishing as fast as the lanes go for
      --s4-duration s; delivered events/s in that window, and its ratio to bare and seed.

Scenarios of our server only (they ignore --systems):
  S5  reconnect storm: --s5-streams streams over --s5-workflows workflows, --s5-rate
      events/s in all published over HTTP throughout; the server is stopped (SIGTERM, and
      separately SIGKILL: --s5-signals) and a new one started on the same port. Streams
      reconnect like EventSource (the server's `retry:`, `Last-Event-ID`); a failed POST is
      sent again with the same idempotency keys. Measured from the new server's readiness:
      when every stream was back (200) and when every stream had every event published up
      to then (the restart's backlog, the retried POSTs included); then, after a terminal
      event, that every stream is told 204. The baselines keep no history (seed, bare)
      or only in the memory of the process that is restarted (Nchan): no replay to test.
  W2  S2 at --w2-rate events/s (--s2-streams streams) and S4, our server with
      `--workers 1` and `--workers 2` in the same run; ratios of the two (W2S2 or W2S4
      alone: only that half).
  RC  S2 at --rc-rate events/s (--s2-streams streams), our server on single Redis
      (--redis-url) and on a private local 3-master Redis Cluster (testing/procs.py), in the
      same run; p99 ratio.

Publishing is over HTTP for every system, from this process, on keep-alive connections.
Systems that take a JSON array per POST (ours, seed, bare) get one batch per POST: in
S2 the events due in each --tick-ms tick; in S4 --s4-batch events per POST on --s4-lanes
concurrent lanes. Nchan takes one message per POST: S2 spreads each event's POST over
--s2-lanes-single lanes, S4 runs --s4-lanes-single concurrent lanes. S3 sends one POST
per event, each at its due time to within --s3-tick-ms (1 ms): 1,000 independent
workflows do not publish in bursts of ten every 10 ms. Each lane has its own
sequence, so order is checked per lane. Every event carries the publisher's time.time().

    python -m bench.fanout --quick
    python -m bench.fanout --runs 3
    python -m bench.fanout --scenarios S5,W2,RC --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from redis.asyncio import Redis

from server import redis_keys
from server.overview import runs
from testing import procs

from . import cpu_quota
from .loadgen import (
    HttpPublisher,
    Ledger,
    Recorder,
    StreamGroup,
    connections_per_process,
    cpu_seconds,
    dumps,
    listening,
    process_tree,
    raise_nofile,
    redis_clients,
    redis_free_slots,
    rss_kib,
    self_cpu_seconds,
    set_parsing,
)

REPO = Path(__file__).resolve().parent.parent
NCHAN_CONF = REPO / "bench" / "baselines" / "nchan.conf"
HOST = "127.0.0.1"
Result = dict[str, Any]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class System:
    name: str
    batch: bool  # accepts a JSON array per POST
    sub_path: Callable[[str], str]
    pub_path: Callable[[str], str]
    server_args: tuple[str, ...] = ()  # ours: more flags
    cluster: bool = False  # ours: on the private Redis Cluster (args.cluster_url)

    @property
    def ours(self) -> bool:
        return self.name.startswith("ours")


def _events_path(wf: str) -> str:
    return f"/workflows/{wf}/events"


SYSTEMS: dict[str, System] = {
    "ours": System("ours", True, _events_path, _events_path),
    "seed": System("seed", True, _events_path, _events_path),
    "bare": System("bare", True, _events_path, _events_path),
    "nchan": System("nchan", False, lambda wf: f"/sub/{wf}", lambda wf: f"/pub/{wf}"),
}
# Our server in other set-ups (W2, RC).
VARIANTS: dict[str, System] = {
    "ours-w1": System("ours-w1", True, _events_path, _events_path, ("--workers", "1")),
    "ours-w2": System("ours-w2", True, _events_path, _events_path, ("--workers", "2")),
    "ours-cluster": System("ours-cluster", True, _events_path, _events_path, cluster=True),
}


@dataclass
class Running:
    system: System
    port: int
    proc: subprocess.Popen[bytes]
    tmp: Path
    cpu_groups: list[Path] = field(default_factory=list)  # with --cpu-quota

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for name in ("server.log", "error.log"):
            path = self.tmp / name
            if path.exists():
                out += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(out)


class StartFailed(Exception):
    pass


def _argv(system: System, port: int, tmp: Path, args: argparse.Namespace) -> list[str]:
    py = sys.executable
    if system.ours:
        url = args.cluster_url if system.cluster else args.redis_url
        return [
            py,
            "-m",
            "server",
            "--redis-url",
            url,
            "--port",
            str(port),
            *args.server_arg,
            *system.server_args,
        ]
    if system.name in ("seed", "bare"):
        module = "seed_style" if system.name == "seed" else "bare_hub"
        return [
            py,
            "-m",
            f"bench.baselines.{module}",
            "--port",
            str(port),
            "--redis-url",
            args.redis_url,
        ]
    nginx = shutil.which("nginx")
    if nginx is None:
        raise StartFailed("nginx is not installed (apt-get install nginx libnginx-mod-nchan)")
    conf = tmp / "nchan.conf"
    conf.write_text(NCHAN_CONF.read_text().replace("@PORT@", str(port)))
    return [nginx, "-c", str(conf), "-p", f"{tmp}/", "-e", str(tmp / "error.log")]


def spawn(
    system: System, port: int, tmp: Path, args: argparse.Namespace
) -> subprocess.Popen[bytes]:
    """Start `system` on `port`, its output appended to `tmp`/server.log."""
    with (tmp / "server.log").open("ab") as log:
        return subprocess.Popen(
            _argv(system, port, tmp, args),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=raise_nofile,  # the server holds as many sockets as we do
        )


async def wait_answering(
    running: Running, path: str, timeout: float = 30.0, poll: float = 0.1
) -> None:
    """Poll `path` until it answers 200; StartFailed when the process exits or time is up."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while True:
            if running.proc.poll() is not None:
                raise StartFailed(f"{running.system.name} exited: {running.log_tail()}")
            try:
                async with session.get(running.base + path) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise StartFailed(f"{running.system.name} did not answer in {timeout:g} s")
            await asyncio.sleep(poll)


@contextlib.asynccontextmanager
async def launched(
    system: System, args: argparse.Namespace, port: int | None = None
) -> AsyncIterator[Running]:
    """Start `system` on a free port, wait for it to answer, and always stop it.

    Whoever replaces `running.proc` (S5 restarts the server) leaves the stopping to this."""
    tmp = Path(tempfile.mkdtemp(prefix=f"fanout-{system.name}-"))
    port = port or free_port()
    running = Running(system, port, spawn(system, port, tmp, args), tmp)
    try:
        # Ours: /readyz, so the Redis client is set up before the first burst of streams (on
        # a Redis Cluster, concurrent first requests can fail with 500: see RESULTS.md).
        await wait_answering(running, "/readyz" if system.ours else "/healthz")
        serving = await serving_pids(running) if system.ours else []
        if args.cpu_quota and system.ours:
            with cpu_quota.capped(serving, args.cpu_quota) as groups:
                running.cpu_groups = groups
                yield running
        else:
            yield running
    finally:
        proc = running.proc
        tree = running.pids()
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), 10)
        except TimeoutError:
            proc.kill()
            await asyncio.to_thread(proc.wait)
        for pid in tree[1:]:  # nginx's worker if the master did not take it down
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


async def serving_pids(running: Running, timeout: float = 15.0) -> list[int]:
    """The processes that serve: the server itself, or with `--workers N` its N workers
    (the supervisor only waits), once all of them are up."""
    args = running.system.server_args
    workers = int(args[args.index("--workers") + 1]) if "--workers" in args else 1
    if workers == 1:
        return [running.proc.pid]
    deadline = time.monotonic() + timeout
    # Every worker listening: the kernel spreads new connections over those that do, so
    # a stream opened while one still starts would all go to the other.
    while not (len(pids := running.pids()[1:]) >= workers and all(listening(pids, running.port))):
        if time.monotonic() > deadline:
            raise StartFailed(f"{running.system.name}: not {workers} workers after {timeout} s")
        await asyncio.sleep(0.1)
    return pids


def new_id(tag: str) -> str:
    return f"bench-{tag}-{uuid.uuid4().hex[:10]}"


async def cleanup_keys(args: argparse.Namespace, workflows: list[str]) -> None:
    """Our server's keys of these workflows and their run index entries (baselines and
    Nchan store nothing in Redis)."""
    redis = Redis.from_url(args.redis_url)
    try:
        for i in range(0, len(workflows), 500):
            keys = [k for wf in workflows[i : i + 500] for k in redis_keys.workflow_keys(wf)]
            await redis.delete(*keys)
        await runs.RunIndex(redis, retention_seconds=1).forget(workflows)
    finally:
        await redis.aclose()


def delivery(group: StreamGroup, ledger: Ledger, rec: Recorder) -> Result:
    expected = sum(ledger.published(s.key) for s in group.streams)
    missing = sum(max(0, ledger.published(s.key) - s.count) for s in group.streams)
    return {
        "expected": expected,
        "received": rec.received,
        "missing": missing,
        "dups": rec.dups,
        "skips": rec.skips,
        "gaps": rec.gaps,
        "dropped_streams": rec.dropped,
        "all_delivered": missing == 0 and rec.dups == 0 and rec.skips == 0 and rec.gaps == 0,
    }


def latency(rec: Recorder) -> Result:
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 2)

    return {
        "p50_ms": ms(rec.percentile(0.50)),
        "p99_ms": ms(rec.percentile(0.99)),
        "max_ms": ms(rec.max_delay()),
    }


def all_caught_up(group: StreamGroup, ledger: Ledger) -> Callable[[], bool]:
    return lambda: all(s.count >= ledger.published(s.key) for s in group.streams)


def per_worker(srv: Running) -> str | None:
    """Open streams per process of our server with --workers, e.g. "480+520"; else None."""
    if not srv.system.ours or "--workers" not in srv.system.server_args:
        return None
    counts = connections_per_process(srv.pids(), srv.port)
    return "+".join(str(n) for n in counts if n) or "0"


# ---------------------------------------------------------------------------------------
# Scenarios


async def s1(system: System, n: int, args: argparse.Namespace) -> Result:
    if system.name == "seed":
        probe = Redis.from_url(args.redis_url)
        try:
            free = await redis_free_slots(probe)
        finally:
            await probe.aclose()
        nofile = raise_nofile()
        if n + args.redis_margin > free:
            return {
                "skipped": f"needs {n} Redis connections; Redis accepts {free} more "
                f"(maxclients) and others share it"
            }
        if 2 * n + 200 > nofile:
            return {"skipped": f"needs {2 * n} sockets in one process; fd hard limit {nofile}"}
    async with launched(system, args) as srv:
        rec = Recorder()
        warm, main = new_id("s1w"), new_id("s1")
        ledger = Ledger(2, 1)
        group = StreamGroup(HOST, srv.port, rec)
        pub = HttpPublisher(srv.base, system.pub_path, batch=system.batch)
        try:
            # Warm-up on another workflow: first connection, first event, first POST.
            await group.open([(0, system.sub_path(warm))])
            await pub.send(ledger, 0, warm, 0, 1)
            await group.wait_for(lambda: rec.received >= 1, 10)
            await asyncio.sleep(0.5)
            pids = srv.pids()
            rss0 = rss_kib(pids)
            took = await group.open(
                [(1, system.sub_path(main))] * n,
                concurrency=args.connect_concurrency,
                timeout=args.connect_timeout,
            )
            established = group.established - 1
            await pub.send(ledger, 1, main, 0, 1)
            await group.wait_for(all_caught_up(group, ledger), 30, stall=10)
            await asyncio.sleep(1.0)
            pids = srv.pids()
            rss1 = rss_kib(pids)
            probe = Redis.from_url(args.redis_url)
            try:
                clients = await redis_clients(probe, pids, args.redis_port)
            finally:
                await probe.aclose()
            got = sum(1 for s in group.streams[1:] if s.count == 1)
            return {
                "streams": n,
                "established": established,
                "failed": len(group.failed),
                "fail_sample": group.failed[:2],
                "connect_s": round(took, 2),
                "got_event": got,
                "rss_base_mib": round(rss0 / 1024, 1),
                "rss_mib": round(rss1 / 1024, 1),
                "kib_per_stream": round((rss1 - rss0) / max(n, 1), 2),
                "redis_pubsub": clients["pubsub"],
                "redis_normal": clients["normal"],
                "dropped_streams": rec.dropped,
            }
        finally:
            await pub.aclose()
            await group.close()
            if system.name == "ours":
                await cleanup_keys(args, [warm, main])


async def paced(
    pub: HttpPublisher,
    ledger: Ledger,
    workflows: list[str],
    rate_per_wf: float,
    duration: float,
    tick: float,
    batch: bool,
) -> float:
    """Publish `rate_per_wf` events/s to each workflow for `duration` s; returns wall time.

    One workflow (S2), a batch system: every tick, the events that fell due go out as one
    POST (awaited, so a slow server gets bigger batches, not more concurrent POSTs). One
    workflow, one message per POST (Nchan): each due event is its own POST, spread over
    `ledger.lanes` lanes (in order within a lane), so the rate does not hang on one round
    trip. Many workflows (S3): due slots spread evenly, one POST each, one in flight per
    workflow, sent at the first tick at or after its slot (so keep the tick short)."""
    loop = asyncio.get_running_loop()
    w = len(workflows)
    total = round(rate_per_wf * duration) * w
    start = loop.time()
    sent = 0
    busy: set[asyncio.Task[int]] = set()
    deadline = start + duration + 30

    def spawn(key: int, lane: int) -> None:
        task = asyncio.create_task(pub.send(ledger, key, workflows[key], lane, 1))
        busy.add(task)
        task.add_done_callback(busy.discard)

    while sent < total and loop.time() < deadline:
        elapsed = loop.time() - start
        due = min(total, int(elapsed * rate_per_wf * w) + 1)
        if w == 1 and batch:
            if due > sent:
                await pub.send(ledger, 0, workflows[0], 0, due - sent)
                sent = due
        elif w == 1:
            for j in range(sent, due):
                spawn(0, j % ledger.lanes)
            sent = max(sent, due)
        else:
            for j in range(sent, due):
                spawn(j % w, 0)
            sent = max(sent, due)
        next_tick = start + (int((loop.time() - start) / tick) + 1) * tick
        await asyncio.sleep(max(0.0, next_tick - loop.time()))
    if busy:
        await asyncio.wait(busy, timeout=30)
    return loop.time() - start


async def live(
    system: System,
    args: argparse.Namespace,
    *,
    tag: str,
    workflows: int,
    per_workflow: int,
    rate: float,
    duration: float,
    tick_ms: float,
) -> Result:
    """S2 and S3: open the streams, publish at a fixed rate, drain, measure."""
    # One event per POST over several lanes: Nchan always, every system with --s2-single
    # (as an engine reporting each event as it happens, not batching them).
    single = workflows == 1 and (not system.batch or args.s2_single)
    lanes = args.s2_lanes_single if single else 1
    async with launched(system, args) as srv:
        rec = Recorder(lanes=lanes)
        ids = [new_id(tag) for _ in range(workflows)]
        ledger = Ledger(workflows, lanes)
        group = StreamGroup(HOST, srv.port, rec)
        pub = HttpPublisher(srv.base, system.pub_path, batch=system.batch, pool=64)
        try:
            paths = [(k, system.sub_path(wf)) for k, wf in enumerate(ids)] * per_workflow
            await group.open(
                paths, concurrency=args.connect_concurrency, timeout=args.connect_timeout
            )
            if group.failed:
                return {"skipped": f"{len(group.failed)} streams failed: {group.failed[:2]}"}
            await pub.warm()  # the publisher's connections are no part of the measurement
            pids = srv.pids()
            spread = per_worker(srv)
            cpu0, me0, t0 = cpu_seconds(pids), self_cpu_seconds(), time.monotonic()
            wall = await paced(pub, ledger, ids, rate, duration, tick_ms / 1000, not single)
            await group.wait_for(all_caught_up(group, ledger), args.drain, stall=args.stall)
            wall_all = time.monotonic() - t0
            cpu = cpu_seconds(srv.pids()) - cpu0
            return {
                "streams": len(group.streams),
                "published": ledger.ok,
                "publish_errors": ledger.errors,
                "error_sample": ledger.error_samples[:2],
                "rate": round(ledger.ok / wall, 1),
                **delivery(group, ledger, rec),
                **latency(rec),
                "server_cpu_pct": round(100 * cpu / wall_all, 1),
                "loadgen_cpu_pct": round(100 * (self_cpu_seconds() - me0) / wall_all, 1),
                "rss_mib": round(rss_kib(srv.pids()) / 1024, 1),
                "per_worker": spread,
            }
        finally:
            await pub.aclose()
            await group.close()
            if system.ours and not system.cluster:  # the cluster is thrown away
                await cleanup_keys(args, ids)


async def s4(system: System, args: argparse.Namespace, profile: str | None) -> Result:
    lanes = args.s4_lanes if system.batch else args.s4_lanes_single
    batch = args.s4_batch if system.batch else 1
    async with launched(system, args) as srv:
        rec = Recorder(lanes=lanes)
        wf = new_id("s4")
        ledger = Ledger(1, lanes)
        group = StreamGroup(HOST, srv.port, rec)
        pub = HttpPublisher(srv.base, system.pub_path, batch=system.batch, pool=lanes + 4)
        spy: subprocess.Popen[bytes] | None = None
        try:
            await group.open(
                [(0, system.sub_path(wf))] * args.s4_streams,
                concurrency=args.connect_concurrency,
                timeout=args.connect_timeout,
            )
            if group.failed:
                return {"skipped": f"{len(group.failed)} streams failed: {group.failed[:2]}"}
            await pub.warm()
            if profile:
                spy = start_profiler(
                    srv.proc.pid,
                    args.s4_duration,
                    profile,
                    children="--workers" in system.server_args,
                )
            pids = srv.pids()
            spread = per_worker(srv)
            cpu0, me0 = cpu_seconds(pids), self_cpu_seconds()
            loop = asyncio.get_running_loop()
            start = loop.time()
            end = start + args.s4_duration
            r0 = rec.received

            async def lane(i: int) -> None:
                while loop.time() < end:
                    await pub.send(ledger, 0, wf, i, batch)

            await asyncio.wait_for(
                asyncio.gather(*(lane(i) for i in range(lanes))), args.s4_duration + 60
            )
            window = loop.time() - start
            in_window = rec.received - r0
            cpu = cpu_seconds(srv.pids()) - cpu0
            me = self_cpu_seconds() - me0
            throttled = cpu_quota.throttled_seconds(srv.cpu_groups)
            await group.wait_for(all_caught_up(group, ledger), args.drain, stall=args.stall)
            drain_s = loop.time() - start - window
            return {
                "streams": len(group.streams),
                "lanes": lanes,
                "batch": batch,
                "published": ledger.ok,
                "publish_errors": ledger.errors,
                "error_sample": ledger.error_samples[:2],
                "published_per_s": round(ledger.ok / window),
                "delivered_per_s": round(in_window / window),
                "drain_s": round(drain_s, 1),
                **delivery(group, ledger, rec),
                **latency(rec),
                "server_cpu_pct": round(100 * cpu / window, 1),
                # CPU-seconds per delivered event (in the window), in microseconds.
                "cpu_us_per_event": round(1e6 * cpu / in_window, 2) if in_window else None,
                "throttled_s": round(throttled, 2) if srv.cpu_groups else None,
                "loadgen_cpu_pct": round(100 * me / window, 1),
                "rss_mib": round(rss_kib(srv.pids()) / 1024, 1),
                "per_worker": spread,
            }
        finally:
            await pub.aclose()
            await group.close()
            if spy is not None:
                finish_profiler(spy, profile or "")
            if system.ours and not system.cluster:
                await cleanup_keys(args, [wf])


async def s5(args: argparse.Namespace, sig: signal.Signals) -> Result:
    """Reconnect storm: stop our server under load, start a new one, measure the catch-up.

    A stream counts as caught up once it is back (a 200 after the stop) and has every event
    of its workflow published until the backlog was flushed; one caught up before the flush
    (it came back that early) is stamped at the flush, at most `backlog_flush_s` late."""
    free_fixed_port = procs.free_fixed_port  # outside the ephemeral range: see there

    system = SYSTEMS["ours"]
    n, w, rate = args.s5_streams, args.s5_workflows, args.s5_rate
    port = free_fixed_port()  # the new server binds it again: no client socket may take it
    loop = asyncio.get_running_loop()
    hard_end = loop.time() + args.s5_timeout  # no load loop, reconnection or wait past this
    async with launched(system, args, port) as srv:
        rec = Recorder()
        ids = [new_id("s5") for _ in range(w)]
        ledger = Ledger(w, 1)
        group = StreamGroup(HOST, srv.port, rec)
        pub = HttpPublisher(
            srv.base, system.pub_path, batch=True, pool=64, retry_for=args.s5_retry_for, timeout=5.0
        )
        sends: list[asyncio.Task[int]] = []
        stop_publishing = False

        async def publish() -> None:
            """`rate` events/s round-robin over the workflows, one POST each, in order per
            workflow (its lock), retried through the restart."""
            start, due_sent = loop.time(), 0
            while not stop_publishing and loop.time() < hard_end:
                due = int((loop.time() - start) * rate) + 1
                for j in range(due_sent, due):
                    sends.append(asyncio.create_task(pub.send(ledger, j % w, ids[j % w], 0, 1)))
                due_sent = max(due_sent, due)
                await asyncio.sleep(args.tick_ms / 1000)

        publisher: asyncio.Task[None] | None = None
        try:
            paths = [(i % w, system.sub_path(ids[i % w])) for i in range(n)]
            took = await group.open(
                paths,
                concurrency=args.connect_concurrency,
                timeout=args.connect_timeout,
                reconnect_until=hard_end,
            )
            if group.failed:
                return {"skipped": f"{len(group.failed)} streams failed: {group.failed[:2]}"}
            publisher = asyncio.create_task(publish())
            await asyncio.sleep(args.s5_before)
            live_before = await group.wait_for(all_caught_up(group, ledger), 10)
            # Stop the server, start a new one on the same port.
            t_kill = loop.time()
            retries_before = len(rec.retry_used)
            old = srv.proc
            old.send_signal(sig)
            try:
                code = await asyncio.wait_for(asyncio.to_thread(old.wait), 10)
            except TimeoutError:
                old.kill()
                code = await asyncio.to_thread(old.wait)
            t_exit = loop.time()
            for pid in process_tree(old.pid)[1:]:  # workers that outlived it, if any
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            srv.proc = spawn(system, srv.port, srv.tmp, args)
            await wait_answering(srv, "/readyz", 30, poll=0.02)
            t_ready = loop.time()
            # Everything due before readiness, retried until stored: the restart's backlog.
            backlog = list(sends)
            if backlog:
                await asyncio.wait(backlog, timeout=max(1.0, hard_end - loop.time()))
            t_flush = loop.time()
            for st in group.streams:  # back (200 after the stop) and has all of it
                st.set_target(ledger.published(st.key), t_kill)
            window_end = t_ready + args.s5_after
            await group.wait_for(
                lambda: all(st.caught_at is not None for st in group.streams),
                max(0.0, min(window_end, hard_end) - loop.time()),
            )
            # Publish on until the window ends, then stop and drain.
            await asyncio.sleep(max(0.0, min(window_end, hard_end) - loop.time()))
            stop_publishing = True
            await publisher
            if sends:
                await asyncio.wait(sends, timeout=max(1.0, hard_end - loop.time()))
            await group.wait_for(all_caught_up(group, ledger), args.drain, stall=args.stall)
            result_delivery = delivery(group, ledger, rec)
            # A terminal event per workflow: each stream ends, reconnects, and gets 204.
            async with aiohttp.ClientSession() as session:
                for wf in ids:
                    body = {"event_type": "workflow_state_changed", "to_state": "COMPLETED"}
                    async with session.post(srv.base + system.pub_path(wf), json=body) as resp:
                        await resp.read()
            await group.wait_for(
                lambda: rec.ended_204 >= n, min(15.0, max(0.0, hard_end - loop.time()))
            )

            def since_ready(ts: list[float]) -> tuple[float | None, float | None]:
                if not ts:
                    return None, None
                return (round(statistics.median(ts) - t_ready, 2), round(max(ts) - t_ready, 2))

            back = [
                st.reconnected_at
                for st in group.streams
                if st.reconnected_at is not None and st.reconnected_at >= t_kill
            ]
            caught = [st.caught_at for st in group.streams if st.caught_at is not None]
            back_p50, back_max = since_ready(back)
            caught_p50, caught_max = since_ready(caught)
            # The delay each stream waited after the stop (the server's last `retry:`).
            first_retry = rec.retry_used[retries_before : retries_before + n]
            return {
                "streams": n,
                "workflows": w,
                "signal": sig.name,
                "connect_s": round(took, 2),
                "live_before": live_before,
                "exit_code": code,
                "exit_s": round(t_exit - t_kill, 2),
                "down_s": round(t_ready - t_kill, 2),
                "retry_min_ms": min(first_retry) if first_retry else None,
                "retry_max_ms": max(first_retry) if first_retry else None,
                "reconnected": len(back),
                "reconnect_p50_s": back_p50,
                "reconnect_max_s": back_max,
                "connect_errors": rec.connect_errors,
                "bad_status": rec.bad_status,
                "statuses": {str(k): v for k, v in sorted(rec.statuses.items())},
                "status_samples": rec.status_samples,
                "backlog_flush_s": round(t_flush - t_ready, 2),
                "caught_up": len(caught),
                "caught_up_p50_s": caught_p50,
                "caught_up_max_s": caught_max,
                "within_10s": len(caught) == n and (caught_max or 0) <= 10.0,
                "published": ledger.ok,
                "posts": ledger.posts,
                "publish_retries": ledger.retries,
                "gave_up": ledger.gave_up,
                "error_sample": ledger.error_samples[:3],
                **result_delivery,
                "ended_204": rec.ended_204,
                "rss_mib": round(rss_kib(srv.pids()) / 1024, 1),
            }
        finally:
            stop_publishing = True
            if publisher is not None:
                publisher.cancel()
            for t in sends:
                t.cancel()
            await pub.aclose()
            await group.close()
            await cleanup_keys(args, ids)


@contextlib.asynccontextmanager
async def redis_cluster(args: argparse.Namespace) -> AsyncIterator[str]:
    """A private 3-master Redis Cluster (testing/procs.py), always stopped; yields its URL."""
    cluster = procs.RedisClusterProcesses()
    try:
        await asyncio.to_thread(cluster.start)
        args.cluster_url = cluster.url
        yield cluster.url
    finally:
        await asyncio.to_thread(cluster.stop)
        for node in cluster.nodes:
            shutil.rmtree(node.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# py-spy


def start_profiler(
    pid: int, seconds: float, path: str, *, children: bool = False
) -> subprocess.Popen[bytes] | None:
    """py-spy on `pid` (and, with `children`, its workers, in one profile)."""
    spy = shutil.which("py-spy")
    if spy is None:
        print("py-spy not installed: no profile", file=sys.stderr)
        return None
    return subprocess.Popen(
        [
            spy,
            "record",
            "-r",
            "200",
            "-d",
            str(int(seconds)),
            "--format",
            "raw",
            "-o",
            path,
            "--pid",
            str(pid),
            "--nonblocking",
            *(["--subprocesses"] if children else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def finish_profiler(spy: subprocess.Popen[bytes], path: str) -> None:
    try:
        _out, err = spy.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        _out, err = spy.communicate()
    if not Path(path).exists():
        print(f"py-spy wrote nothing: {err.decode(errors='replace')[-400:]}", file=sys.stderr)
        return
    print(summarise_profile(path))


def _func(frame: str) -> str:
    """`name (path/file.py:12)` -> `name (file.py)`."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1].rstrip(")")
    return f"{name} ({file})"


def summarise_profile(path: str, top: int = 20) -> str:
    self_counts: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_func(f) for f in stack.split(";")]
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    lines = [f"py-spy profile of our server during S4 ({total} samples): {path}", "  self time:"]
    for f, n in sorted(self_counts.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {100 * n / total:5.1f}%  {f}")
    lines.append("  inclusive:")
    for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[: top + 10]:
        lines.append(f"    {100 * n / total:5.1f}%  {f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Tables


# Each scenario's table columns, in order (S3 reports what S2 does).
_BROADCAST = (
    "rate published all_delivered missing dups p50_ms p99_ms max_ms server_cpu_pct loadgen_cpu_pct"
)
COLUMNS: dict[str, list[str]] = {
    "S1": (
        "established failed connect_s got_event kib_per_stream rss_mib redis_pubsub redis_normal"
    ).split(),
    "S2": _BROADCAST.split(),
    "S3": _BROADCAST.split(),
    "S4": (
        "published_per_s delivered_per_s x_bare x_seed all_delivered missing drain_s "
        "p50_ms p99_ms server_cpu_pct loadgen_cpu_pct"
    ).split(),
    "S5": (
        "exit_code exit_s down_s retry_min_ms retry_max_ms reconnected reconnect_p50_s "
        "reconnect_max_s connect_errors bad_status backlog_flush_s caught_up "
        "caught_up_p50_s caught_up_max_s within_10s published publish_retries gave_up "
        "all_delivered missing dups skips gaps ended_204"
    ).split(),
    "W2S2": (
        "rate published all_delivered missing p50_ms p99_ms p99_x_w1 max_ms "
        "server_cpu_pct cpu_x_w1 rss_mib per_worker loadgen_cpu_pct"
    ).split(),
    "W2S4": (
        "published_per_s delivered_per_s x_w1 all_delivered missing drain_s p50_ms "
        "p99_ms server_cpu_pct cpu_us_per_event cpu_per_event_x_w1 throttled_s rss_mib "
        "per_worker loadgen_cpu_pct"
    ).split(),
    "RC": (
        "rate published all_delivered missing dups p50_ms p99_ms p99_x_single max_ms "
        "server_cpu_pct loadgen_cpu_pct"
    ).split(),
}
NOTES: dict[str, str] = {
    "S5": "Only our server: seed and bare keep no history, Nchan keeps it only in the "
    "memory of the process that is restarted, so none of them can replay after a restart.",
}


def cell(values: list[Any]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if all(isinstance(v, bool) for v in values):
        return "yes" if all(values) else f"no ({sum(not v for v in values)}/{len(values)})"
    if all(isinstance(v, int | float) for v in values):
        med = statistics.median(values)
        big = abs(med) >= 1000

        def fmt(x: float) -> str:
            return f"{x:,.0f}" if big else f"{x:g}"

        if len(values) == 1:
            return fmt(values[0])
        return f"{fmt(med)} ({fmt(min(values))}-{fmt(max(values))})"
    return "/".join(str(v) for v in values)


def table(title: str, kind: str, rows: dict[str, list[Result]]) -> str:
    cols = COLUMNS[kind]
    out = [
        f"### {title}",
        "",
        "| system | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for system, results in rows.items():
        skipped = [r["skipped"] for r in results if "skipped" in r]
        ok = [r for r in results if "skipped" not in r]
        if not ok:
            out.append(f"| {system} | skipped: {skipped[0] if skipped else '-'} |")
            continue
        cells = [cell([r.get(c) for r in ok]) for c in cols]
        note = f" (skipped {len(skipped)}x)" if skipped else ""
        out.append(f"| {system}{note} | " + " | ".join(cells) + " |")
    if kind in NOTES:
        out += ["", NOTES[kind]]
    return "\n".join(out)


def add_ratios(per_run: dict[str, Result]) -> None:
    """x_bare and x_seed of each system in one run (same run, same noise)."""
    bare = per_run.get("bare", {}).get("delivered_per_s")
    seed = per_run.get("seed", {}).get("delivered_per_s")
    for result in per_run.values():
        got = result.get("delivered_per_s")
        if got is not None:
            result["x_bare"] = round(got / bare, 3) if bare else None
            result["x_seed"] = round(got / seed, 2) if seed else None


def ratio(value: Any, base: Any, digits: int = 2) -> float | None:
    if not isinstance(value, int | float) or not isinstance(base, int | float) or not base:
        return None
    return round(value / base, digits)


def add_variant_ratios(kind: str, per_run: dict[str, Result]) -> None:
    """W2 and RC: each set-up against the plain one of the same run."""
    if kind in ("W2S2", "W2S4"):
        base = per_run.get("ours-w1", {})
        for r in per_run.values():
            if kind == "W2S4":
                r["x_w1"] = ratio(r.get("delivered_per_s"), base.get("delivered_per_s"), 3)
                r["cpu_per_event_x_w1"] = ratio(
                    r.get("cpu_us_per_event"), base.get("cpu_us_per_event"), 3
                )
            else:
                r["p99_x_w1"] = ratio(r.get("p99_ms"), base.get("p99_ms"))
                r["cpu_x_w1"] = ratio(r.get("server_cpu_pct"), base.get("server_cpu_pct"))
    if kind == "RC":
        base = per_run.get("ours", {})
        for r in per_run.values():
            r["p99_x_single"] = ratio(r.get("p99_ms"), base.get("p99_ms"))


# ---------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="10%% sizes, 5 s phases: about 2 minutes")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--systems", default="ours,seed,bare,nchan")
    p.add_argument(
        "--scenarios",
        default=None,
        help="of S1-S5,W2 (W2S2, W2S4),RC; default S1-S4 (--quick: all)",
    )
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra flag for our server, e.g. --server-arg=--workers=2",
    )
    p.add_argument("--s1-sizes", default=None, help="default 1000,5000,10000")
    p.add_argument("--s2-streams", type=int, default=None, help="default 1000")
    p.add_argument("--s2-rates", default="100,500")
    p.add_argument(
        "--s2-lanes-single",
        type=int,
        default=8,
        help="S2 POST lanes for one-message-per-POST systems (Nchan)",
    )
    p.add_argument("--s3-workflows", type=int, default=None, help="default 1000")
    p.add_argument("--s4-streams", type=int, default=None, help="default 100")
    p.add_argument("--duration", type=float, default=None, help="S2/S3 seconds; default 20")
    p.add_argument("--s4-duration", type=float, default=None, help="default 10")
    p.add_argument("--s4-lanes", type=int, default=2, help="concurrent batch POST loops")
    p.add_argument("--s4-batch", type=int, default=100, help="events per POST (batch systems)")
    p.add_argument(
        "--s4-lanes-single",
        type=int,
        default=8,
        help="concurrent POST loops for one-message-per-POST systems (Nchan)",
    )
    p.add_argument("--s5-streams", type=int, default=None, help="default 5000")
    p.add_argument("--s5-workflows", type=int, default=None, help="default 100")
    p.add_argument("--s5-rate", type=float, default=50.0, help="events/s over all workflows")
    p.add_argument("--s5-signals", default="TERM,KILL", help="how the server is stopped")
    p.add_argument("--s5-before", type=float, default=3.0, help="s of publishing before")
    p.add_argument(
        "--s5-after", type=float, default=10.0, help="s of publishing after the new server is ready"
    )
    p.add_argument(
        "--s5-retry-for",
        type=float,
        default=30.0,
        help="s a failed POST is retried (same idempotency key)",
    )
    p.add_argument(
        "--s5-timeout", type=float, default=180.0, help="bound of one S5 case (connecting included)"
    )
    p.add_argument("--w2-rate", type=int, default=500, help="W2: S2 events/s")
    p.add_argument("--rc-rate", type=int, default=100, help="RC: S2 events/s")
    p.add_argument(
        "--tick-ms",
        type=float,
        default=10.0,
        help="S2, S5, W2, RC: publishing tick (S2: one batch per tick)",
    )
    p.add_argument(
        "--s3-tick-ms",
        type=float,
        default=1.0,
        help="S3: each POST goes out within this of its due time",
    )
    p.add_argument("--drain", type=float, default=None, help="max wait after publishing")
    p.add_argument("--stall", type=float, default=5.0, help="stop draining after s of nothing")
    p.add_argument(
        "--connect-concurrency",
        type=int,
        default=50,
        help="streams connecting at once (ours fails at ~100: see RESULTS.md)",
    )
    p.add_argument("--connect-timeout", type=float, default=180.0)
    p.add_argument(
        "--redis-margin",
        type=int,
        default=500,
        help="Redis client slots left to others when sizing the seed baseline",
    )
    p.add_argument(
        "--profile",
        default=None,
        help="py-spy raw output path: profile our server during S4 of run 1 (W2S4: "
        "PATH.ours-w1 and PATH.ours-w2, the workers together)",
    )
    p.add_argument(
        "--parse",
        default="shared",
        choices=("shared", "each"),
        help="shared: each distinct block of frames parsed once for all streams; "
        "each: every stream parses its own bytes, as real clients do",
    )
    p.add_argument(
        "--s2-single",
        action="store_true",
        help="S2: one event per POST over --s2-lanes-single lanes for every "
        "system (default: batch systems get one POST per tick)",
    )
    p.add_argument(
        "--cpu-quota",
        type=float,
        default=None,
        help="cap each of our server's serving processes (each worker) at this "
        "many CPUs with the cgroup v1 cpu controller (root), e.g. 0.4",
    )
    p.add_argument("--json", default=None, help="write every result here")
    p.add_argument("--tables-from", default=None, help="print the tables of a --json file")
    args = p.parse_args(argv)
    scale = 0.1 if args.quick else 1.0
    if args.s1_sizes is None:
        args.s1_sizes = ",".join(str(int(n * scale)) for n in (1000, 5000, 10000))
    args.s2_streams = args.s2_streams or int(1000 * scale)
    args.s3_workflows = args.s3_workflows or int(1000 * scale)
    args.s4_streams = args.s4_streams or (10 if args.quick else 100)
    args.duration = args.duration or (5.0 if args.quick else 20.0)
    args.s4_duration = args.s4_duration or (5.0 if args.quick else 10.0)
    args.drain = args.drain or (10.0 if args.quick else 30.0)
    args.s5_streams = args.s5_streams or (500 if args.quick else 5000)
    args.s5_workflows = args.s5_workflows or (10 if args.quick else 100)
    if args.scenarios is None:
        args.scenarios = "S1,S2,S3,S4,S5,W2,RC" if args.quick else "S1,S2,S3,S4"
    args.cluster_url = None
    args.redis_port = urlsplit(args.redis_url).port or 6379
    return args


async def run_one(
    kind: str, param: int, system: System, args: argparse.Namespace, first_run: bool
) -> Result:
    # No collector pauses in the load generator while it measures: one would show as
    # delay on every system. A scenario is bounded; the cycles it leaves go after it.
    gc.collect()
    gc.disable()
    try:
        return await _run_one(kind, param, system, args, first_run)
    finally:
        gc.enable()
        gc.collect()


async def _run_one(
    kind: str, param: int, system: System, args: argparse.Namespace, first_run: bool
) -> Result:
    def broadcast(tag: str) -> Awaitable[Result]:
        """S2's set-up (one workflow, --s2-streams streams, `param` events/s): S2, W2S2, RC."""
        return live(
            system,
            args,
            tag=tag,
            workflows=1,
            per_workflow=args.s2_streams,
            rate=param,
            duration=args.duration,
            tick_ms=args.tick_ms,
        )

    try:
        if kind == "S1":
            return await s1(system, param, args)
        if kind == "S2":
            return await broadcast("s2")
        if kind == "S3":
            return await live(
                system,
                args,
                tag="s3",
                workflows=args.s3_workflows,
                per_workflow=2,
                rate=1.0,
                duration=args.duration,
                tick_ms=args.s3_tick_ms,
            )
        if kind == "S5":
            return await s5(args, signal.Signals(param))
        if kind == "W2S2":
            return await broadcast("w2")
        if kind == "W2S4":
            profile = f"{args.profile}.{system.name}" if args.profile and first_run else None
            return await s4(system, args, profile)
        if kind == "RC":
            if not system.cluster:
                return await broadcast("rc")
            try:
                async with redis_cluster(args):
                    return await broadcast("rc")
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                return {"skipped": f"no Redis Cluster: {exc}"[:300]}
        profile = args.profile if first_run and system.name == "ours" else None
        return await s4(system, args, profile)
    except StartFailed as exc:
        return {"skipped": f"could not start: {exc}"[:300]}


async def main_async(args: argparse.Namespace) -> int:
    raise_nofile()
    set_parsing(args.parse)
    task = asyncio.current_task()
    if task is not None:  # SIGTERM cancels the run, so every started system is stopped
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    chosen = [SYSTEMS[s] for s in args.systems.split(",")]
    cases: list[tuple[str, str, int, list[System]]] = []  # (title, kind, parameter, systems)
    wanted = args.scenarios.split(",")
    if "S1" in wanted:
        for n in (int(x) for x in args.s1_sizes.split(",")):
            cases.append((f"S1 idle, {n:,} streams on one workflow", "S1", n, chosen))
    if "S2" in wanted:
        for rate in (int(x) for x in args.s2_rates.split(",")):
            how = (
                f", one event per POST over {args.s2_lanes_single} lanes" if args.s2_single else ""
            )
            cases.append(
                (
                    f"S2 broadcast, {args.s2_streams:,} streams, {rate} events/s for "
                    f"{args.duration:g} s{how}, parse {args.parse}",
                    "S2",
                    rate,
                    chosen,
                )
            )
    if "S3" in wanted:
        cases.append(
            (
                f"S3 {args.s3_workflows:,} workflows x 2 streams, 1 event/s each for "
                f"{args.duration:g} s",
                "S3",
                0,
                chosen,
            )
        )
    if "S4" in wanted:
        cases.append(
            (f"S4 saturation, {args.s4_streams} streams, {args.s4_duration:g} s", "S4", 0, chosen)
        )
    if "S5" in wanted:
        for name in args.s5_signals.split(","):
            sig = signal.Signals["SIG" + name.strip().upper().removeprefix("SIG")]
            cases.append(
                (
                    f"S5 reconnect storm ({sig.name}), {args.s5_streams:,} streams on "
                    f"{args.s5_workflows} workflows, {args.s5_rate:g} events/s",
                    "S5",
                    int(sig),
                    [SYSTEMS["ours"]],
                )
            )
    workers = [VARIANTS["ours-w1"], VARIANTS["ours-w2"]]
    if "W2" in wanted or "W2S2" in wanted:
        cases.append(
            (
                f"W2S2 --workers 1 vs 2: S2, {args.s2_streams:,} streams, "
                f"{args.w2_rate} events/s for {args.duration:g} s",
                "W2S2",
                args.w2_rate,
                workers,
            )
        )
    if "W2" in wanted or "W2S4" in wanted:
        cases.append(
            (
                f"W2S4 --workers 1 vs 2: S4, {args.s4_streams} streams, {args.s4_duration:g} s",
                "W2S4",
                0,
                workers,
            )
        )
    if "RC" in wanted:
        cases.append(
            (
                f"RC single Redis vs 3-master Redis Cluster: S2, {args.s2_streams:,} "
                f"streams, {args.rc_rate} events/s for {args.duration:g} s",
                "RC",
                args.rc_rate,
                [SYSTEMS["ours"], VARIANTS["ours-cluster"]],
            )
        )
    results: dict[str, dict[str, list[Result]]] = {
        t: {s.name: [] for s in systems} for t, _, _, systems in cases
    }
    started = time.monotonic()
    for run in range(args.runs):
        for title, kind, param, systems in cases:
            per_run: dict[str, Result] = {}
            for system in systems:
                t0 = time.monotonic()
                result = await run_one(kind, param, system, args, run == 0)
                result["run"] = run + 1
                result["seconds"] = round(time.monotonic() - t0, 1)
                per_run[system.name] = result
                print(
                    f"[run {run + 1} {time.monotonic() - started:6.0f}s] {title} / "
                    f"{system.name}: {dumps(result)}",
                    flush=True,
                )
            if kind == "S4":
                add_ratios(per_run)
            add_variant_ratios(kind, per_run)
            for name, result in per_run.items():
                results[title][name].append(result)
        if args.json:
            Path(args.json).write_text(dumps(results))
    print()
    print(
        f"runs: {args.runs}; cells are median (min-max) over runs; "
        f"{time.monotonic() - started:.0f} s total"
    )
    for title, kind, _, _ in cases:
        print()
        print(table(title, kind, results[title]))
    return 0


def print_tables(path: str) -> int:
    """Tables from a --json file (also a partial one, written after every run)."""
    results: dict[str, dict[str, list[Result]]] = json.loads(Path(path).read_text())
    for title, rows in results.items():
        if kind := title.split(" ", 1)[0] if title.split(" ", 1)[0] in COLUMNS else None:
            print()
            print(table(title, kind, {name: rs for name, rs in rows.items() if rs}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tables_from:
        return print_tables(args.tables_from)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
