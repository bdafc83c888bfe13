"""Watchers: the open event, progress and WebSocket streams per workflow, across processes.

Each process counts its own streams (`WatcherCounts`, told where a stream opens and closes)
and a `Reporter` writes them every REPORT_SECONDS into the process's own hash
`{<prefix>:watchers}:p:<process id>` (workflow_id -> count), which expires TTL_MS after its
last report; the sorted set `{<prefix>:watchers}:procs` (score: last report, ms) names the
hashes. `watchers()` sums them. So a count is right within about REPORT_SECONDS of a stream
opening or closing, and a process that dies stops counting TTL_MS after its last report.

Cost: a report is one script a second per process that has streams, carrying only the
workflows whose counts changed (all of them every FULL_EVERY reports, and whenever the hash
was lost); an idle process writes nothing. A read is two round trips (ZRANGE, then one HMGET
per process pipelined) whatever the number of workflows. All of it shares one hash tag, so
on a Redis Cluster it lives in one slot: that slot sees a write per process per second,
never one per event or per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from server import app_keys
from server.redis_keys import PREFIX, watcher_process_key, watcher_procs_key
from server.tasks import stop

logger = logging.getLogger(__name__)

REPORT_SECONDS = 1.0
TTL_MS = 5_000  # a report outlives a few missed ones; a dead process's counts last this long
FULL_EVERY = 10  # every this many reports the whole hash is rewritten (repairs a lost diff)
PRUNE_MS = 60_000  # the process set forgets a process that has not reported for this long
REMOVE_TIMEOUT = 1.0  # a clean shutdown waits at most this long for a report, and a removal


def new_process_id() -> str:
    """Unique per process start; host and pid make it readable in redis-cli."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# KEYS: this process's hash, the process set (one slot). ARGV: hash ttl (ms), process id,
# now (ms), forget reports before (ms), set ttl (ms), mode ('full' rewrites the hash, 'diff'
# applies changes to it), then one JSON array [workflow_id, count, ...] with counts as
# strings ('0' deletes). A diff whose hash is gone (expired, or Redis lost it) writes
# nothing and returns 0: the caller sends the whole hash instead.
_REPORT_LUA = """
if ARGV[6] == 'diff' and redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
if ARGV[6] == 'full' then
  redis.call('DEL', KEYS[1])
end
local pairs = cjson.decode(ARGV[7])
for i = 1, #pairs, 2 do
  if pairs[i + 1] == '0' then
    redis.call('HDEL', KEYS[1], pairs[i])
  else
    redis.call('HSET', KEYS[1], pairs[i], pairs[i + 1])
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return 1
"""


class WatcherCounts:
    """This process's open streams per workflow, and which counts changed since a report."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.dirty: set[str] = set()

    def opened(self, workflow_id: str) -> None:
        self.counts[workflow_id] = self.counts.get(workflow_id, 0) + 1
        self.dirty.add(workflow_id)

    def closed(self, workflow_id: str) -> None:
        left = self.counts.get(workflow_id, 0) - 1
        if left > 0:
            self.counts[workflow_id] = left
        else:
            self.counts.pop(workflow_id, None)
        self.dirty.add(workflow_id)

    def take_dirty(self) -> set[str]:
        dirty, self.dirty = self.dirty, set()
        return dirty


class Reporter:
    """Writes one process's counts to Redis every `interval` seconds (see the module doc)."""

    def __init__(
        self,
        redis: Any,
        counts: WatcherCounts,
        *,
        prefix: str = PREFIX,
        process_id: str | None = None,
        interval: float = REPORT_SECONDS,
        ttl_ms: int = TTL_MS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.counts = counts
        self.prefix = prefix
        self.process_id = process_id or new_process_id()
        self.interval = interval
        self.ttl_ms = ttl_ms
        self.clock = clock
        self.key = watcher_process_key(self.process_id, prefix=prefix)
        self._held = False  # our hash holds counts (as far as we know)
        self._since_full = 0
        self._failed = False
        self._stop = asyncio.Event()

    async def report(self) -> None:
        """One report: the changes since the last, or everything when due or needed."""
        dirty = self.counts.take_dirty()
        if not self._held and not self.counts.counts:
            return  # nothing in Redis and nothing to say: an idle process writes nothing
        full = not self._held or self._failed or self._since_full + 1 >= FULL_EVERY
        try:
            if full or not await self._write(
                "diff", {w: self.counts.counts.get(w, 0) for w in dirty}
            ):
                await self._write("full", self.counts.counts)
                full = True
        except BaseException:
            self._failed = True  # what this report carried is sent again, whole, next time
            raise
        self._failed = False
        self._since_full = 0 if full else self._since_full + 1
        self._held = bool(self.counts.counts)

    async def _write(self, mode: str, counts: dict[str, int]) -> bool:
        now = round(self.clock() * 1000)
        flat = [value for wf, n in counts.items() for value in (wf, str(n))]
        args = [
            str(self.ttl_ms),
            self.process_id,
            str(now),
            str(now - PRUNE_MS),
            str(PRUNE_MS),
            mode,
            json.dumps(flat, ensure_ascii=False),
        ]
        keys = [self.key, watcher_procs_key(prefix=self.prefix)]
        done = await self.redis.eval(_REPORT_LUA, 2, *keys, *args)
        return bool(done)

    async def run(self) -> None:
        """Report every `interval` seconds until stop(); Redis outages are waited out."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)
            if self._stop.is_set():
                return
            try:
                await self.report()
            except (RedisError, OSError) as exc:
                logger.debug("watcher report failed: %s", exc)

    def stop(self) -> None:
        """End run() after the report under way, if any."""
        self._stop.set()

    async def remove(self) -> None:
        """A clean exit: our counts go at once, not TTL_MS later."""
        try:
            async with asyncio.timeout(REMOVE_TIMEOUT):
                await self.redis.delete(self.key)
                await self.redis.zrem(watcher_procs_key(prefix=self.prefix), self.process_id)
        except (RedisError, OSError, TimeoutError) as exc:
            logger.debug("watcher report not removed (it expires by itself): %s", exc)


async def watchers(redis: Any, workflow_ids: list[str], *, prefix: str = PREFIX) -> dict[str, int]:
    """Open streams per workflow across every live process: two round trips for any list."""
    ids = list(dict.fromkeys(workflow_ids))
    result = dict.fromkeys(ids, 0)
    if not ids:
        return result
    members = await redis.zrange(watcher_procs_key(prefix=prefix), 0, -1)
    if not members:
        return result
    async with redis.pipeline(transaction=False) as pipe:
        for member in members:
            name = member.decode() if isinstance(member, bytes) else member
            pipe.hmget(watcher_process_key(name, prefix=prefix), ids)
        rows = await pipe.execute()
    for row in rows:
        for workflow_id, value in zip(ids, row, strict=True):
            if value is not None:
                result[workflow_id] += int(value)
    return result


async def reporter_ctx(app: web.Application) -> AsyncIterator[None]:
    """A cleanup_ctx (after the one that opens Redis): report while the app serves."""
    reporter = Reporter(app[app_keys.redis_key], app[app_keys.watchers_key])
    task = asyncio.create_task(reporter.run(), name="watchers-report")
    yield
    # Stopped, not only cancelled: a Redis client busy with a report has been seen to
    # swallow the cancellation, and the loop would then report forever.
    reporter.stop()
    try:
        async with asyncio.timeout(REMOVE_TIMEOUT):
            await asyncio.shield(task)
    except TimeoutError:
        await stop([task], what="watchers")
    await reporter.remove()
