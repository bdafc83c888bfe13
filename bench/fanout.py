"""Fan-out scenarios of issue 6 against four systems in one run.

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

Publishing is over HTTP for every system, from this process, on keep-alive connections.
Systems that take a JSON array per POST (ours, seed, bare) get one batch per POST: in
S2 the events due in each --tick-ms tick; in S4 --s4-batch events per POST on --s4-lanes
concurrent lanes. Nchan takes one message per POST: S2 spreads each event's POST over
--s2-lanes-single lanes, S4 runs --s4-lanes-single concurrent lanes. Each lane has its own
sequence, so order is checked per lane. Every event carries the publisher's time.time().

    python -m bench.fanout --quick
    python -m bench.fanout --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from redis.asyncio import Redis

from .loadgen import (
    HttpPublisher,
    Ledger,
    Recorder,
    StreamGroup,
    cpu_seconds,
    dumps,
    process_tree,
    raise_nofile,
    redis_clients,
    redis_free_slots,
    rss_kib,
    self_cpu_seconds,
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


def _events_path(wf: str) -> str:
    return f"/workflows/{wf}/events"


SYSTEMS: dict[str, System] = {
    "ours": System("ours", True, _events_path, _events_path),
    "seed": System("seed", True, _events_path, _events_path),
    "bare": System("bare", True, _events_path, _events_path),
    "nchan": System("nchan", False, lambda wf: f"/sub/{wf}", lambda wf: f"/pub/{wf}"),
}


@dataclass
class Running:
    system: System
    port: int
    proc: subprocess.Popen[bytes]
    tmp: Path

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
    if system.name == "ours":
        return [py, "-m", "server", "--redis-url", args.redis_url, "--port", str(port),
                *args.server_arg]  # fmt: skip
    if system.name in ("seed", "bare"):
        module = "seed_style" if system.name == "seed" else "bare_hub"
        return [py, "-m", f"bench.baselines.{module}", "--port", str(port),
                "--redis-url", args.redis_url]  # fmt: skip
    nginx = shutil.which("nginx")
    if nginx is None:
        raise StartFailed("nginx is not installed (apt-get install nginx libnginx-mod-nchan)")
    conf = tmp / "nchan.conf"
    conf.write_text(NCHAN_CONF.read_text().replace("@PORT@", str(port)))
    return [nginx, "-c", str(conf), "-p", f"{tmp}/", "-e", str(tmp / "error.log")]


@contextlib.asynccontextmanager
async def launched(system: System, args: argparse.Namespace) -> AsyncIterator[Running]:
    """Start `system` on a free port, wait for it to answer, and always stop it."""
    tmp = Path(tempfile.mkdtemp(prefix=f"fanout-{system.name}-"))
    port = free_port()
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(
        _argv(system, port, tmp, args),
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=raise_nofile,  # the server holds as many sockets as we do
    )
    running = Running(system, port, proc, tmp)
    try:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as session:
            while True:
                if proc.poll() is not None:
                    raise StartFailed(f"{system.name} exited: {running.log_tail()}")
                try:
                    async with session.get(running.base + "/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise StartFailed(f"{system.name} did not answer in 30 s")
                await asyncio.sleep(0.1)
        yield running
    finally:
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
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def new_id(tag: str) -> str:
    return f"bench-{tag}-{uuid.uuid4().hex[:10]}"


async def cleanup_keys(args: argparse.Namespace, workflows: list[str]) -> None:
    """Our server's keys of these workflows (baselines and Nchan store nothing in Redis)."""
    redis = Redis.from_url(args.redis_url)
    try:
        for i in range(0, len(workflows), 500):
            keys = [
                f"wf:{{{wf}}}:{part}"
                for wf in workflows[i : i + 500]
                for part in ("events", "trimmed", "idem", "progress")
            ]
            await redis.delete(*keys)
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
            return {"skipped": f"needs {n} Redis connections; Redis accepts {free} more "
                               f"(maxclients) and others share it"}  # fmt: skip
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
    workflow."""
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
) -> Result:
    """S2 and S3: open the streams, publish at a fixed rate, drain, measure."""
    lanes = 1 if system.batch or workflows > 1 else args.s2_lanes_single
    async with launched(system, args) as srv:
        rec = Recorder(lanes=lanes)
        ids = [new_id(tag) for _ in range(workflows)]
        ledger = Ledger(workflows, lanes)
        group = StreamGroup(HOST, srv.port, rec)
        pub = HttpPublisher(srv.base, system.pub_path, batch=system.batch, pool=64)
        try:
            paths = [(k, system.sub_path(wf)) for k, wf in enumerate(ids)] * per_workflow
            await group.open(paths, concurrency=args.connect_concurrency,
                             timeout=args.connect_timeout)  # fmt: skip
            if group.failed:
                return {"skipped": f"{len(group.failed)} streams failed: {group.failed[:2]}"}
            pids = srv.pids()
            cpu0, me0, t0 = cpu_seconds(pids), self_cpu_seconds(), time.monotonic()
            wall = await paced(pub, ledger, ids, rate, duration, args.tick_ms / 1000,
                               system.batch)  # fmt: skip
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
            }
        finally:
            await pub.aclose()
            await group.close()
            if system.name == "ours":
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
            await group.open([(0, system.sub_path(wf))] * args.s4_streams,
                             concurrency=args.connect_concurrency,
                             timeout=args.connect_timeout)  # fmt: skip
            if group.failed:
                return {"skipped": f"{len(group.failed)} streams failed: {group.failed[:2]}"}
            if profile:
                spy = start_profiler(srv.proc.pid, args.s4_duration, profile)
            pids = srv.pids()
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
                "loadgen_cpu_pct": round(100 * me / window, 1),
            }
        finally:
            await pub.aclose()
            await group.close()
            if spy is not None:
                finish_profiler(spy, profile or "")
            if system.name == "ours":
                await cleanup_keys(args, [wf])


# ---------------------------------------------------------------------------------------
# py-spy


def start_profiler(pid: int, seconds: float, path: str) -> subprocess.Popen[bytes] | None:
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
    lines = [f"py-spy profile of our server during S4 ({total} samples): {path}",
             "  self time:"]  # fmt: skip
    for f, n in sorted(self_counts.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {100 * n / total:5.1f}%  {f}")
    lines.append("  inclusive:")
    for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[: top + 10]:
        lines.append(f"    {100 * n / total:5.1f}%  {f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Tables


COLUMNS: dict[str, list[str]] = {
    "S1": ["established", "failed", "connect_s", "got_event", "kib_per_stream", "rss_mib",
           "redis_pubsub", "redis_normal"],
    "S2": ["rate", "published", "all_delivered", "missing", "dups", "p50_ms", "p99_ms",
           "max_ms", "server_cpu_pct", "loadgen_cpu_pct"],
    "S3": ["rate", "published", "all_delivered", "missing", "dups", "p50_ms", "p99_ms",
           "max_ms", "server_cpu_pct", "loadgen_cpu_pct"],
    "S4": ["published_per_s", "delivered_per_s", "x_bare", "x_seed", "all_delivered",
           "missing", "drain_s", "p50_ms", "p99_ms", "server_cpu_pct", "loadgen_cpu_pct"],
}  # fmt: skip


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
    out = [f"### {title}", "", "| system | " + " | ".join(cols) + " |",
           "|---" * (len(cols) + 1) + "|"]  # fmt: skip
    for system, results in rows.items():
        skipped = [r["skipped"] for r in results if "skipped" in r]
        ok = [r for r in results if "skipped" not in r]
        if not ok:
            out.append(f"| {system} | skipped: {skipped[0] if skipped else '-'} |")
            continue
        cells = [cell([r.get(c) for r in ok]) for c in cols]
        note = f" (skipped {len(skipped)}x)" if skipped else ""
        out.append(f"| {system}{note} | " + " | ".join(cells) + " |")
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


# ---------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="10%% sizes, 5 s phases: about 2 minutes")  # fmt: skip
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--systems", default="ours,seed,bare,nchan")
    p.add_argument("--scenarios", default="S1,S2,S3,S4")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra flag for our server, e.g. --server-arg=--workers=2")  # fmt: skip
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
    p.add_argument("--tick-ms", type=float, default=10.0)
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
        help="py-spy raw output path: profile our server during S4 of run 1",
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
    args.redis_port = urlsplit(args.redis_url).port or 6379
    return args


async def run_one(kind: str, param: int, system: System, args: argparse.Namespace,
                  first_run: bool) -> Result:  # fmt: skip
    try:
        if kind == "S1":
            return await s1(system, param, args)
        if kind == "S2":
            return await live(system, args, tag="s2", workflows=1, per_workflow=args.s2_streams,
                              rate=param, duration=args.duration)  # fmt: skip
        if kind == "S3":
            return await live(system, args, tag="s3", workflows=args.s3_workflows,
                              per_workflow=2, rate=1.0, duration=args.duration)  # fmt: skip
        profile = args.profile if first_run and system.name == "ours" else None
        return await s4(system, args, profile)
    except StartFailed as exc:
        return {"skipped": f"could not start: {exc}"[:300]}


async def main_async(args: argparse.Namespace) -> int:
    raise_nofile()
    task = asyncio.current_task()
    if task is not None:  # SIGTERM cancels the run, so every started system is stopped
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    systems = [SYSTEMS[s] for s in args.systems.split(",")]
    cases: list[tuple[str, str, int]] = []  # (title, kind, parameter)
    wanted = args.scenarios.split(",")
    if "S1" in wanted:
        for n in (int(x) for x in args.s1_sizes.split(",")):
            cases.append((f"S1 idle, {n:,} streams on one workflow", "S1", n))
    if "S2" in wanted:
        for rate in (int(x) for x in args.s2_rates.split(",")):
            cases.append((f"S2 broadcast, {args.s2_streams:,} streams, {rate} events/s for "
                          f"{args.duration:g} s", "S2", rate))  # fmt: skip
    if "S3" in wanted:
        cases.append((f"S3 {args.s3_workflows:,} workflows x 2 streams, 1 event/s each for "
                      f"{args.duration:g} s", "S3", 0))  # fmt: skip
    if "S4" in wanted:
        cases.append((f"S4 saturation, {args.s4_streams} streams, {args.s4_duration:g} s",
                      "S4", 0))  # fmt: skip
    results: dict[str, dict[str, list[Result]]] = {t: {s.name: [] for s in systems}
                                                   for t, _, _ in cases}  # fmt: skip
    started = time.monotonic()
    for run in range(args.runs):
        for title, kind, param in cases:
            per_run: dict[str, Result] = {}
            for system in systems:
                t0 = time.monotonic()
                result = await run_one(kind, param, system, args, run == 0)
                result["run"] = run + 1
                result["seconds"] = round(time.monotonic() - t0, 1)
                per_run[system.name] = result
                print(f"[run {run + 1} {time.monotonic() - started:6.0f}s] {title} / "
                      f"{system.name}: {dumps(result)}", flush=True)  # fmt: skip
            if kind == "S4":
                add_ratios(per_run)
            for name, result in per_run.items():
                results[title][name].append(result)
        if args.json:
            Path(args.json).write_text(dumps(results))
    print()
    print(f"runs: {args.runs}; cells are median (min-max) over runs; "
          f"{time.monotonic() - started:.0f} s total")  # fmt: skip
    for title, kind, _ in cases:
        print()
        print(table(title, kind, results[title]))
    return 0


def print_tables(path: str) -> int:
    """Tables from a --json file (also a partial one, written after every run)."""
    results: dict[str, dict[str, list[Result]]] = json.loads(Path(path).read_text())
    for title, rows in results.items():
        if kind := title[:2] if title[:2] in COLUMNS else None:
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
