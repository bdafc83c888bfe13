"""`python -m server watch`: a real CLI process against a real server process, output read."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from server import redis_keys
from server.client.sse import EventStreamParser
from server.client.watch import format_duration
from testing.events import short_run
from testing.http import publish
from testing.procs import RestartPair, ServerProcess, server_env
from tests.conftest import REDIS_URL, real_redis_or_skip

ROOT = Path(__file__).resolve().parent.parent


class Watch:
    """A `python -m server watch` child process and everything it printed so far."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    @classmethod
    async def start(cls, base: str, wf: str) -> Watch:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server",
            "watch",
            wf,
            "--url",
            base,
            cwd=ROOT,
            env=server_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    @property
    def out(self) -> str:
        return "".join(self.lines)

    async def until(self, done: Callable[[Watch], bool], timeout: float = 15.0) -> None:
        """Read lines until `done(self)` holds (bounded)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while not done(self):
            left = deadline - time.monotonic()
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), max(left, 0.01))
            except TimeoutError:
                raise AssertionError(
                    f"watch: condition not met in {timeout} s:\n{self.out}"
                ) from None
            if not line:
                raise AssertionError(f"watch ended early:\n{self.out}")
            self.lines.append(line.decode())

    async def finish(self, timeout: float = 20.0) -> tuple[int, str]:
        """Wait (bounded) for the exit; (exit code, stderr). stdout goes on in `out`."""
        try:
            rest, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        except TimeoutError:
            self.proc.kill()
            rest, err = await self.proc.communicate()
            raise AssertionError(f"watch did not exit:\n{self.out}{rest.decode()}") from None
        self.lines.extend(rest.decode().splitlines(keepends=True))
        assert self.proc.returncode is not None
        return self.proc.returncode, err.decode()

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


@pytest.fixture
async def server() -> AsyncIterator[ServerProcess]:
    """A live server subprocess on the embedded Redis."""
    srv = ServerProcess(clean=True)
    try:
        await srv.start()
        yield srv
    finally:
        srv.stop()


def event_lines(out: str) -> list[str]:
    """The event lines of the output: `HH:MM:SS  <event_type>  ...`."""
    return [line for line in out.splitlines() if line[10:].startswith(("workflow_", "node_"))]


def event_types(out: str) -> list[str]:
    return [line[10:].split()[0] for line in event_lines(out)]


def has(text: str) -> Callable[[Watch], bool]:
    return lambda w: text in w.out


async def test_watch_prints_each_event_and_exits_0_after_the_terminal_state(
    server: ServerProcess,
) -> None:
    wf = "watch-" + uuid.uuid4().hex[:12]
    events = short_run()
    watch = await Watch.start(server.url, wf)
    try:
        await watch.until(has("connected to"))  # the stream is open before anything exists
        await publish(server.url, wf, events[:3])
        for event in events[3:]:
            await publish(server.url, wf, event)
            await asyncio.sleep(0.02)
        code, err = await watch.finish()
    finally:
        watch.kill()
    out = watch.out
    assert code == 0, err
    assert event_types(out) == [e["event_type"] for e in events]
    assert "\x1b" not in out  # not a terminal: plain lines, no cursor tricks
    assert "데이터 조회 (n0)" in out and "품질 판정 (n1)" in out
    assert "error: 연결 시간 초과" in out
    assert "1.2 s" in out  # duration_ms rendered
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("[########################] 100.0%  4 of 4 nodes  COMPLETED"), last
    assert " of 4 nodes  RUNNING" in out  # progress lines along the way


async def test_watch_of_a_finished_workflow_replays_it_and_exits_0(server: ServerProcess) -> None:
    wf = "watch-" + uuid.uuid4().hex[:12]
    events = short_run(3)
    await publish(server.url, wf, events)
    watch = await Watch.start(server.url, wf)
    try:
        code, _ = await watch.finish()
    finally:
        watch.kill()
    assert code == 0
    assert event_types(watch.out) == [e["event_type"] for e in events]


async def test_watch_rejects_a_bad_workflow_id() -> None:
    watch = await Watch.start("http://127.0.0.1:9", "bad id")
    try:
        code, err = await watch.finish()
    finally:
        watch.kill()
    assert code == 2 and "not a valid workflow id" in err


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
async def test_watch_reconnects_with_last_event_id_and_misses_nothing(sig: int) -> None:
    """The watched server dies mid-run and comes back on the same port; events published
    meanwhile through a second server on the same Redis are printed once each."""
    redis = await real_redis_or_skip()
    wf = "watch-" + uuid.uuid4().hex[:12]
    events = short_run(6)
    pair = RestartPair({"REDIS_URL": REDIS_URL}, retry_ms=300)
    other = pair.other
    watch = None
    try:
        await pair.start()
        watch = await Watch.start(pair.url, wf)
        await watch.until(has("connected to"))
        half = len(events) // 2
        for event in events[:half]:
            await publish(other.url, wf, event)
        await watch.until(lambda w: len(event_lines(w.out)) == half)
        pair.end(sig)
        await watch.until(has("reconnecting in"))
        for event in events[half:-2]:
            await publish(other.url, wf, event)  # while the watched server is down
        await pair.restart()
        for event in events[-2:]:
            await publish(other.url, wf, event)
        code, err = await watch.finish(timeout=30)
    finally:
        if watch is not None:
            watch.kill()
        pair.stop()
        await redis.delete(*redis_keys.workflow_keys(wf))
        await redis.aclose()
    assert code == 0, err
    assert event_types(watch.out) == [e["event_type"] for e in events]
    assert "reconnected to" in watch.out and "after event" in watch.out


def test_watch_parser_handles_split_chunks_crlf_and_comments() -> None:
    # watch reads with the client's EventStreamParser: the `retry:` frame sets the parser's
    # retry (no message, as in EventSource), the comment dispatches nothing.
    raw = (
        "retry: 500\r\n\r\n: keep-alive\n\n"
        'id: 1-0\nevent: node_started\ndata: {"a":\r\ndata: "품"}\r\n\r\n'
    ).encode()
    for size in (1, 2, 3, 7, len(raw)):
        parser = EventStreamParser()
        msgs = [m for i in range(0, len(raw), size) for m in parser.feed(raw[i : i + size])]
        assert [(m.event, m.id) for m in msgs] == [("node_started", "1-0")]
        assert parser.retry == 500
        assert msgs[0].data == '{"a":\n"품"}'


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.84, "0.8 s"), (12.4, "12 s"), (150, "2 min 30 s"), (120, "2 min"), (3720, "1 h 2 min")],
)
def test_durations_read_like_a_person_would_say_them(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
