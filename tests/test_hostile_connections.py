"""Hostile connections over real sockets: slow loris, fd floods, clients that leave, parser
errors, tokens in the access log, a frozen Redis (issue 12, items 4, 8, 9, 10, 11, 15, 16).

Servers run the way production runs them: in process through `connections.serve` (the
same guarded protocol, runner and access logger as `python -m server`), or as a
`python -m server` subprocess where the fd limit matters.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from server import app_keys, auth, connections
from server.app import create_app
from server.settings import Settings
from testing.metrics import sample
from testing.procs import ROOT, RedisProcess, ServerProcess

MAX_ID = "18446744073709551615-18446744073709551615"


@asynccontextmanager
async def guarded(redis: Any = None, **overrides: Any) -> AsyncIterator[connections.Served]:
    """The app over `redis` (or its own client from REDIS_URL) with production's protections."""
    settings = Settings(**overrides)
    async with connections.serve(create_app(settings, redis=redis), settings) as served:
        yield served


async def raw(port: int, data: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw loopback connection that has sent `data`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if data:
        writer.write(data)
        await writer.drain()
    return reader, writer


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, float]:
    """All bytes until the server closes (EOF or reset), and how long that took."""
    started = time.monotonic()
    out = b""
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionError:
                break
            if not chunk:
                break
            out += chunk
    return out, time.monotonic() - started


async def read_until(reader: asyncio.StreamReader, marker: bytes, timeout: float = 5) -> bytes:
    """Bytes up to and including the first `marker`."""
    async with asyncio.timeout(timeout):
        return await reader.readuntil(marker)


def close(writer: asyncio.StreamWriter) -> None:
    """Drop the connection at once, as a client that leaves does."""
    writer.transport.abort()


def split_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


async def wait_for(check: Callable[[], Any], timeout: float, step: float = 0.02) -> Any:
    """Poll `check` until it returns something truthy; its last value after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(step)


# -- item 4: deadlines -------------------------------------------------------------------


async def test_slow_heads_and_bodies_are_closed_at_their_deadlines_and_streams_are_not() -> None:
    header, body = 1.0, 1.5
    async with guarded(
        header_timeout_seconds=header, body_timeout_seconds=body, heartbeat_seconds=0.3
    ) as srv:
        silent, silent_w = await raw(srv.port)
        trickle_r, trickle_w = await raw(srv.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        post_r, post_w = await raw(
            srv.port,
            b"POST /workflows/w1/events HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n[",
        )
        stream_r, stream_w = await raw(
            srv.port, b"GET /workflows/w1/events HTTP/1.1\r\nHost: x\r\n\r\n"
        )

        async def trickle(writer: asyncio.StreamWriter, byte: bytes) -> None:
            # A byte every 0.2 s: each one would re-arm an idle timeout, never a deadline.
            for _ in range(40):
                await asyncio.sleep(0.2)
                if writer.transport.is_closing():
                    return
                writer.write(byte)

        feeders = [
            asyncio.create_task(trickle(trickle_w, b"X")),
            asyncio.create_task(trickle(post_w, b" ")),
        ]
        try:
            results = await asyncio.gather(
                read_until_closed(silent, 6),
                read_until_closed(trickle_r, 6),
                read_until_closed(post_r, 8),
                return_exceptions=True,
            )
            assert not any(isinstance(r, BaseException) for r in results), results
            (silent_data, silent_s), (trickle_data, trickle_s), (post_data, post_s) = results  # type: ignore[misc]
            # Closed silently (nothing to answer: no request was made), within 0.5 s of it.
            assert silent_data == b"" and header - 0.1 < silent_s < header + 0.5, silent_s
            assert trickle_data == b"" and trickle_s < header + 0.5, trickle_s
            # The body deadline answers 408 problem+json and then closes the connection.
            status, headers, payload = split_response(post_data)
            assert status == 408, post_data
            assert headers["content-type"].startswith("application/problem+json")
            assert json.loads(payload)["status"] == 408
            assert post_s < body + connections.LINGER_SECONDS + 0.5, post_s
            # The stream outlived both deadlines and still gets its keep-alives.
            seen = await read_until(stream_r, b": keep-alive\n", timeout=2)
            assert b"200 OK" in seen
            await read_until(stream_r, b": keep-alive\n", timeout=2)
            assert not stream_w.transport.is_closing()
        finally:
            for task in feeders:
                task.cancel()
            for writer in (silent_w, trickle_w, post_w, stream_w):
                close(writer)


def test_effective_limits_leave_room_below_the_fd_limit() -> None:
    fitted = connections.fit_to_fd_limit(Settings(), 20_000)
    assert fitted.max_connections == 2_000
    assert fitted.max_streams == 20_000 - 2_000 - connections.FD_RESERVE
    small = connections.fit_to_fd_limit(Settings(), 1_024)
    assert small.max_connections + small.max_streams + connections.FD_RESERVE <= 1_024
    assert small.max_streams > 0 and small.max_connections > 0
    # A configured value below what the fds allow stays as configured.
    assert connections.fit_to_fd_limit(Settings(max_streams=500), 20_000).max_streams == 500


# -- item 4: 2,000 attackers against a server with 1,024 fds ------------------------------


class LimitedServer(ServerProcess):
    """`python -m server` with RLIMIT_NOFILE lowered to `fds` (soft and hard)."""

    def __init__(self, fds: int, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(*args, env=env, clean=True)
        self.fds = fds

    def launch(self) -> None:
        fds = self.fds

        def lower() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fds, fds))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--port", str(self.port), *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=lower,
        )


@dataclass
class Attack:
    """What the attacking connections saw."""

    connected: int = 0
    failed: int = 0
    lifetimes: list[float] = field(default_factory=list)  # connect to the server's close
    still_open: int = 0


ATTACK_HEADS = (
    b"",  # silent
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ",  # a head that never ends
    b"POST /workflows/w/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 100000\r\n\r\n[",  # a body that never ends
)


async def attack(port: int, count: int, hold: float, *, connect_batch: int = 500) -> Attack:
    """Open `count` connections that never finish a request; wait up to `hold` seconds after
    each connect for the server to close it."""
    result = Attack()
    gate = asyncio.Semaphore(connect_batch)

    async def one(i: int) -> None:
        async with gate:
            try:
                async with asyncio.timeout(3):
                    reader, writer = await raw(port, ATTACK_HEADS[i % len(ATTACK_HEADS)])
            except (OSError, TimeoutError):
                result.failed += 1
                return
        result.connected += 1
        opened = time.monotonic()
        try:
            try:
                async with asyncio.timeout(hold):
                    while await reader.read(4096):
                        pass
                result.lifetimes.append(time.monotonic() - opened)
            except ConnectionError:
                result.lifetimes.append(time.monotonic() - opened)
            except TimeoutError:
                result.still_open += 1
        finally:
            close(writer)

    await asyncio.gather(*(one(i) for i in range(count)))
    return result


def probe_healthz(port: int, until: threading.Event) -> list[float]:
    """/healthz latencies (seconds, inf for a failure), one new connection every 0.1 s.

    In a thread of its own with blocking sockets: on the attackers' busy event loop a
    probe would send its request late, looking to the server like one more silent client.
    """
    latencies: list[float] = []
    for _ in range(600):  # bounded: at most a minute
        if until.is_set():
            break
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
        try:
            conn.request("GET", "/healthz")
            ok = conn.getresponse().status == 200
        except OSError as exc:
            print(f"/healthz failed after {time.monotonic() - started:.3f} s: {exc!r}")
            ok = False
        finally:
            conn.close()
        latencies.append(time.monotonic() - started if ok else float("inf"))
        until.wait(0.1)
    return latencies


ATTACKERS = int(os.environ.get("WFSSE_ATTACKERS", "2000"))  # 20,000 by hand, see README
ATTACK_FDS = int(os.environ.get("WFSSE_ATTACK_FDS", "1024"))


async def test_a_flood_of_slow_connections_leaves_healthz_answering_and_the_log_quiet() -> None:
    header, body = 2.0, 3.0
    server = LimitedServer(
        ATTACK_FDS,
        "--header-timeout-seconds",
        str(header),
        "--body-timeout-seconds",
        str(body),
    )
    try:
        await server.start()
        lines_before = len(server.output().splitlines())
        done = threading.Event()
        prober = asyncio.create_task(asyncio.to_thread(probe_healthz, server.port, done))
        started = time.monotonic()
        result = await attack(server.port, ATTACKERS, hold=body + connections.LINGER_SECONDS + 2)
        attack_seconds = time.monotonic() - started
        done.set()
        latencies = await prober
        async with aiohttp.ClientSession() as s, s.get(f"{server.url}/metrics") as resp:
            shed = [
                line
                for line in (await resp.text()).splitlines()
                if line.startswith("wfsse_connections_shed_total")
            ]
        print("\n".join(shed))
        log = server.output().splitlines()[lines_before:]
        print(
            f"\n{ATTACKERS} attackers vs {ATTACK_FDS} fds in {attack_seconds:.1f} s: "
            f"connected {result.connected}, failed {result.failed}, open at the end "
            f"{result.still_open}, longest life {max(result.lifetimes, default=0):.2f} s; "
            f"/healthz {len(latencies)} probes, max {max(latencies):.3f} s, "
            f"median {sorted(latencies)[len(latencies) // 2]:.3f} s; {len(log)} log lines"
        )
        print("\n".join(log[:20]))
        assert server.proc is not None and server.proc.poll() is None, server.output()[-3000:]
        assert latencies and max(latencies) < 1.0, latencies
        assert result.still_open == 0, result
        # Every attacker is closed within its deadline (or earlier, to make room for others).
        assert max(result.lifetimes) < body + connections.LINGER_SECONDS + 1.0
        assert result.connected >= ATTACKERS * 0.9, result
        assert len(log) < 30, "\n".join(log[:50])
        assert not any("out of system resource" in line for line in log[5:]), log[:50]
    finally:
        server.stop()


# -- item 8: a client that leaves frees its slot at once ----------------------------------


SSE_HEAD = "GET /workflows/{wf}/events HTTP/1.1\r\nHost: x\r\n\r\n"
PROGRESS_HEAD = (
    "GET /workflows/{wf}/progress HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
)
WS_HEAD = (
    "GET /workflows/{wf}/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.mark.backends("redis")
async def test_a_client_that_leaves_frees_its_stream_slot_and_gauge_at_once(
    redis: Any, new_workflow: Callable[[], str]
) -> None:
    wf = new_workflow()
    limit = 30
    async with guarded(redis, max_streams=limit) as srv:
        app_metrics = srv.app[app_keys.metrics_key]
        await srv.app[app_keys.publisher_key].publish(
            wf, {"event_type": "node_started", "node_id": "a"}
        )
        heads = [SSE_HEAD] * 10 + [PROGRESS_HEAD] * 10 + [WS_HEAD] * 10
        markers = [b"retry: 3000\n\n"] * 10 + [b"event: progress\n"] * 10 + [b"\r\n\r\n"] * 10
        writers = []
        for head, marker in zip(heads, markers, strict=True):
            reader, writer = await raw(srv.port, head.format(wf=wf).encode())
            seen = await read_until(reader, marker)
            assert b" 200 " in seen or b" 101 " in seen, seen
            writers.append(writer)
        reader, writer = await raw(srv.port, SSE_HEAD.format(wf=wf).encode())
        seen = await read_until(reader, b"\r\n\r\n")
        close(writer)
        assert b" 503 " in seen, seen  # the limit is reached

        for writer in writers:
            close(writer)
        left = time.monotonic()

        def gauges() -> float:
            text = app_metrics.render().decode()
            return sum(
                sample(text, "wfsse_open_streams", kind=k) or 0.0
                for k in ("events", "progress", "websocket")
            )

        assert await wait_for(lambda: gauges() == 0, 1.0), gauges()
        assert len(srv.app[app_keys.streams_key].open) == 0
        # A real client gets its stream at once (HEARTBEAT_SECONDS is the default 15 s).
        reader, writer = await raw(srv.port, SSE_HEAD.format(wf=wf).encode())
        seen = await read_until(reader, b"\r\n\r\n")
        close(writer)
        assert b" 200 " in seen, seen
        assert time.monotonic() - left < 1.0


# -- item 9: the largest event id ---------------------------------------------------------


async def test_the_largest_event_id_gets_a_stream_that_speaks(
    redis: Any, new_workflow: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    wf = new_workflow()
    async with guarded(redis, heartbeat_seconds=0.3) as srv:
        await srv.app[app_keys.publisher_key].publish(
            wf, {"event_type": "node_started", "node_id": "a"}
        )
        head = f"GET /workflows/{wf}/events HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {MAX_ID}\r\n\r\n"
        reader, writer = await raw(srv.port, head.encode())
        try:
            seen = await read_until(reader, b"retry: 3000\n\n")
            assert b" 200 " in seen
            # Nothing can follow the largest id: keep-alives, and no event.
            for _ in range(3):
                seen = await read_until(reader, b": keep-alive\n\n", timeout=1.5)
                assert b"event:" not in seen and b"data:" not in seen, seen
        finally:
            close(writer)
        # One past it can never exist: 400, before Redis is asked.
        async with aiohttp.ClientSession() as s:
            over = "18446744073709551616-0"
            async with s.get(
                f"{srv.url}/workflows/{wf}/events", headers={"Last-Event-ID": over}
            ) as resp:
                assert resp.status == 400
    failed = [r for r in caplog.records if "catch-up" in r.getMessage() or r.levelno >= 40]
    assert not failed, [r.getMessage() for r in failed]


# -- item 10: tokens never reach the access log -------------------------------------------


async def test_tokens_never_reach_the_access_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    secret = "s" * 32
    token = auth.mint(secret, ["*"], 60)
    signature = token.rsplit(".", 1)[1]
    async with guarded(access_log=True, subscribe_secret=secret) as srv:
        async with aiohttp.ClientSession() as s:
            base = f"{srv.url}/workflows/wf-1/progress"
            for url, headers in (
                (f"{base}?access_token={token}&x=1", {}),
                (f"{base}?access%5Ftoken={token}", {}),
                (base, {"Authorization": f"Bearer {token}"}),
                (base, {"Cookie": f"access_token={token}"}),
                (base, {"Referer": f"http://page.example/?access_token={token}"}),
            ):
                async with s.get(url, headers=headers) as resp:
                    assert resp.status in (401, 404)  # the workflow is unknown anyway
        lines = await wait_for(
            lambda: [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"], 2
        )
    assert len(lines) == 5, lines
    assert all("/workflows/wf-1/progress" in line for line in lines), lines
    assert not [line for line in lines if signature in line], lines
    assert "access_token=REDACTED&x=1" in lines[0], lines[0]


# -- item 11: errors of aiohttp's parser --------------------------------------------------


MARKER = b"SECRETMARKER"
BAD_REQUESTS = {
    "oversize header": b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + MARKER * 1000 + b"\r\n\r\n",
    "oversize line": b"GET /" + MARKER * 1000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "content-length and chunked": (
        b"POST /workflows/w/events HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\nX-M: " + MARKER + b"\r\n\r\n0\r\n\r\n"
    ),
    "NUL in the path": b"GET /" + MARKER + b"\x00x HTTP/1.1\r\nHost: x\r\n\r\n",
    "0xff in the path": b"GET /" + MARKER + b"\xffx HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_parser_errors_are_problem_json_and_echo_nothing(case: str) -> None:
    async with guarded() as srv:
        reader, writer = await raw(srv.port, BAD_REQUESTS[case])
        try:
            data, _ = await read_until_closed(reader, 5)
        finally:
            close(writer)
    status, headers, body = split_response(data)
    assert 400 <= status < 500, data[:300]
    assert headers["content-type"] == "application/problem+json; charset=utf-8", data[:300]
    problem = json.loads(body)
    assert set(problem) == {"type", "title", "status", "detail"} and problem["status"] == status
    assert MARKER not in data and b"SECRET" not in data, data[:300]


# -- item 15: /readyz while Redis is frozen -----------------------------------------------


async def test_readyz_answers_within_a_second_while_redis_is_frozen() -> None:
    redis_proc = RedisProcess()
    redis_proc.start()
    assert redis_proc.proc is not None
    pid = redis_proc.proc.pid
    stopped = False
    try:
        async with guarded(redis_url=redis_proc.url) as srv:
            wf = "t-" + uuid.uuid4().hex[:12]
            await srv.app[app_keys.publisher_key].publish(
                wf, {"event_type": "node_started", "node_id": "a"}
            )
            async with aiohttp.ClientSession() as s:

                async def timed(path: str) -> tuple[int, float]:
                    started = time.monotonic()
                    async with asyncio.timeout(10), s.get(srv.url + path) as resp:
                        await resp.read()
                        return resp.status, time.monotonic() - started

                assert (await timed("/readyz"))[0] == 200
                os.kill(pid, signal.SIGSTOP)
                stopped = True
                (ready, ready_s), (progress, progress_s) = await asyncio.gather(
                    timed("/readyz"), timed(f"/workflows/{wf}/progress")
                )
                print(
                    f"\nfrozen Redis: /readyz {ready} in {ready_s:.2f} s, "
                    f"/progress {progress} in {progress_s:.2f} s"
                )
                assert ready == 503 and ready_s < 1.6, (ready, ready_s)
                # /progress keeps the command deadline (5 s, swept every 0.5 s): 503 then.
                assert progress == 503 and progress_s < 6.5, (progress, progress_s)
                os.kill(pid, signal.SIGCONT)
                stopped = False
                statuses: list[int] = []

                async def ready_again() -> bool:
                    statuses.append((await timed("/readyz"))[0])
                    return statuses[-1] == 200

                for _ in range(50):
                    if await ready_again():
                        break
                    await asyncio.sleep(0.1)
                assert statuses[-1] == 200, statuses
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)
        redis_proc.kill()


# -- item 16: a client that leaves in the middle of a body --------------------------------


async def test_a_client_leaving_mid_body_is_one_info_line_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with guarded() as srv:
        head = (
            b"POST /workflows/w1/events HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 10000\r\n\r\n"
        )
        _, writer = await raw(srv.port, head + b"[" + b" " * 4999)
        assert await wait_for(lambda: srv.guard.phases()["body"] == 1, 2)  # handler reads
        before = len(caplog.records)
        close(writer)

        def logged() -> list[logging.LogRecord]:
            return [r for r in caplog.records[before:] if r.name.startswith(("aiohttp", "server"))]

        records = await wait_for(logged, 3)
    assert records, "nothing was logged about the abandoned request"
    assert all(r.levelno < logging.WARNING and r.exc_info is None for r in records), [
        (r.levelname, r.getMessage()) for r in records
    ]
    assert len(records) == 1, [r.getMessage() for r in records]
