"""The live overview: `GET /workflows` with `Accept: text/event-stream`.

A stream gets an `event: run` frame per summary of the first page, then one for each run
whose summary changes (state, counts, ETA or watchers), at most MIN_INTERVAL apart per
run. A reconnect gets the first page again, which is every listed run's current summary:
nothing is lost by a drop, so the frames carry no ids to resume from.

One feed per process serves all of its overview streams and computes each changed run's
summary once for all of them. It learns of changes without putting any event through a
shared key: it follows the live channels of the runs still going, through the same hub
subscription as the workflow streams (a notify-only reader: it holds no frames), and the
run index's shard channels, on which the index announces a new run or a changed state
(at most once a second per run, plus state changes). Watcher counts are read once a second
for the runs it follows and has shown.

Why one module of ~450 lines: the feed, its per-stream client and the stream handler
share the follow/detach bookkeeping; apart, each would need the others' internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web
from redis.exceptions import RedisError

from server import app_keys, connections, sse
from server.fanout.hub import Hub
from server.fanout.ring import Subscription, Wakeup
from server.models import TERMINAL_STATES
from server.overview.runs import RunIndex
from server.overview.summaries import list_page, summaries
from server.progress.service import ProgressService
from server.redis_keys import runs_notice_id
from server.streams.events import Heartbeat
from server.streams.watchers import watchers
from server.tasks import stop

if TYPE_CHECKING:
    from server import wire

logger = logging.getLogger(__name__)

MIN_INTERVAL = 0.25  # SPEC: at most 4 frames per second per run
ETA_REUSE_SECONDS = 15.0  # a run's ETA in the overview is re-estimated at most this often
ESTIMATES_PER_BATCH = 32  # runs re-estimated per summaries() call
WATCHERS_SECONDS = 1.0  # how often watcher counts are read for the runs shown
FOLLOW_MAX = 2_000  # runs still going whose live channels a feed follows at most
SHOWN_MAX = 2_000  # runs whose last summary a feed remembers (to send changes only)
CLIENT_FRAMES = 10_000  # frames a slow overview client may fall behind before it is ended
DETACH_SECONDS = 1.0  # the longest a feed waits for an UNSUBSCRIBE
CLOSE_SECONDS = 3.0  # the longest a shutdown waits for the feed to stop
GOING = ("CREATED", "PENDING", "RUNNING", "PAUSED")
# Fields whose change is news; updated_at moves with every event, the ETA counts down.
_COMPARED = (
    "state",
    "total_nodes",
    "completed_nodes",
    "failed_nodes",
    "percentage",
    "watchers",
    "definition_id",
)


def run_frame(summary: wire.RunSummary) -> bytes:
    return sse.encode(json.dumps(summary, ensure_ascii=False, separators=(",", ":")), event="run")


def _updated(summary: wire.RunSummary) -> datetime:
    try:
        updated = summary["updated_at"]
        if updated is not None:
            return datetime.fromisoformat(updated)
    except (KeyError, TypeError, ValueError):  # a frame's summary, decoded again
        pass
    return datetime.min.replace(tzinfo=UTC)


def not_older(frames: list[bytes], first: Sequence[wire.RunSummary]) -> list[bytes]:
    """The frames queued while a first page was read, less those older than the page's
    summary of their run (written after the page, they would move a list back)."""
    floor = {s["workflow_id"]: _updated(s) for s in first}
    kept = []
    for frame in frames:
        summary = json.loads(frame.split(b"data: ", 1)[1])
        shown = floor.get(summary["workflow_id"])
        if shown is None or _updated(summary) >= shown:
            kept.append(frame)
    return kept


def changed(old: wire.RunSummary | None, new: wire.RunSummary, *, eta_moved: bool) -> bool:
    """Whether `new` is news to a client that has `old`: a compared field, or a new ETA."""
    if old is None:
        return True
    return eta_moved or any(old.get(k) != new.get(k) for k in _COMPARED)


@dataclass(eq=False)
class OverviewClient:
    """One overview stream: its filter, and the frames waiting for it."""

    states: frozenset[str]
    definition_id: str | None
    readable: frozenset[str] | None  # None: every run
    frames: list[bytes] = field(default_factory=list)
    wakeup: Wakeup = field(default_factory=Wakeup)
    overflowed: bool = False

    def wants(self, summary: wire.RunSummary) -> bool:
        return (
            (not self.states or summary.get("state") in self.states)
            and (self.definition_id is None or summary.get("definition_id") == self.definition_id)
            and (self.readable is None or summary["workflow_id"] in self.readable)
        )

    def offer(self, frame: bytes) -> None:
        if len(self.frames) >= CLIENT_FRAMES:
            self.overflowed = True  # it reconnects and reads the first page again
        else:
            self.frames.append(frame)
        self.wakeup.set()


class OverviewFeed:
    """Per process: follows the runs, computes changed summaries, hands out frames."""

    def __init__(
        self,
        hub: Hub,
        index: RunIndex,
        tracker: ProgressService,
        redis: Any,
        on_frame: Callable[[], None] = lambda: None,
    ) -> None:
        self.on_frame = on_frame  # a changed summary handed to one client
        self.hub, self.index, self.tracker, self.redis = hub, index, tracker, redis
        self.clients: set[OverviewClient] = set()
        self._follows: dict[str, Subscription] = {}
        self._notices: list[Subscription] = []
        self._dirty: set[str] = set()
        self._etas: dict[str, float | None] = {}  # the ETA last sent, as a finish time
        self._shown: OrderedDict[str, wire.RunSummary] = OrderedDict()
        self._sent_at: dict[str, float] = {}
        self._estimated_at: dict[str, float] = {}  # loop time of the last new estimate
        self._tasks: list[asyncio.Task[None]] = []
        self._kick = Wakeup()
        self._lock = asyncio.Lock()
        # From _start() to _stop(): a late task or attach after a stop (one that ignored its
        # cancellation, or a start cut short by close()) adds nothing to a stopped feed.
        self._active = False

    @property
    def running(self) -> bool:
        return self._active

    async def add(self, client: OverviewClient) -> None:
        self.clients.add(client)
        async with self._lock:
            if not self._active:
                await self._start()

    async def remove(self, client: OverviewClient) -> None:
        self.clients.discard(client)
        async with self._lock:
            if not self.clients and self._active:
                await self._stop()

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._active = True
        for k in range(self.index.shards):
            sub = await self.hub.attach(runs_notice_id(k, prefix=self.index.prefix))
            if not self._active:
                await self._detach(sub)
                return
            self._notices.append(sub)
            self._tasks.append(loop.create_task(self._read_notices(sub)))
        self._tasks.append(loop.create_task(self._tick()))
        self._tasks.append(loop.create_task(self._poll_watchers()))
        try:
            going = await self.index.page(states=GOING, limit=FOLLOW_MAX)
        except RedisError as exc:
            logger.info("overview: could not list the runs going (%s); notices only", exc)
        else:
            for w in going.workflow_ids:
                await self._follow(w)

    async def close(self) -> None:
        """At shutdown, before the hub closes; within CLOSE_SECONDS, whatever holds the
        feed: a stream starting it may hold its lock while it attaches up to FOLLOW_MAX runs
        on a slow Redis, and a shutdown must not wait for that (a CI teardown of the
        cluster tests once hung here for over 120 s). Past the bound the feed's tasks are
        cancelled without waiting; the hub, closed next, forgets their subscriptions."""
        try:
            async with asyncio.timeout(CLOSE_SECONDS), self._lock:
                if self._active:
                    await self._stop()
        except TimeoutError:
            logger.warning("overview: the feed did not stop within %g s; cancelled", CLOSE_SECONDS)
            self._active = False
            tasks, self._tasks = self._tasks, []
            for task in tasks:
                task.cancel()

    async def _stop(self) -> None:
        self._active = False
        tasks, self._tasks = self._tasks, []
        await stop(tasks, what="overview")  # bounded: see server/tasks.py
        # All at once, within one DETACH_SECONDS: one at a time, 2,000 followed runs on a slow
        # Redis held a shutdown for minutes (the hub forgets each at once either way).
        subs = [*self._notices, *self._follows.values()]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DETACH_SECONDS):
                await asyncio.gather(*(self.hub.detach(s) for s in subs), return_exceptions=True)
        self._notices.clear()
        self._follows.clear()
        self._dirty.clear()
        self._shown.clear()
        self._etas.clear()
        self._sent_at.clear()
        self._estimated_at.clear()

    async def _follow(self, workflow_id: str) -> None:
        if not self._active or workflow_id in self._follows or len(self._follows) >= FOLLOW_MAX:
            return
        sub = await self.hub.attach(workflow_id)
        if not self._active or workflow_id in self._follows:
            await self._detach(sub)  # stopped meanwhile, or followed by a concurrent call
            return
        sub.notify_only = True
        self._follows[workflow_id] = sub
        self._tasks.append(asyncio.get_running_loop().create_task(self._watch(sub)))

    async def _unfollow(self, workflow_id: str) -> None:
        sub = self._follows.pop(workflow_id, None)
        if sub is not None:
            sub.wakeup.set()  # its task sees it is no longer followed and ends
            await self._detach(sub)

    async def _detach(self, sub: Subscription) -> None:
        """Detach, not waiting on a Redis that is away (the reader forgets it either way:
        the hub's UNSUBSCRIBE is only the upstream's bookkeeping)."""
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(DETACH_SECONDS):
                await self.hub.detach(sub)

    async def _watch(self, sub: Subscription) -> None:
        """A followed run: any new event (or a resync) marks it dirty."""
        w = sub.workflow_id
        while self._follows.get(w) is sub:
            sub.wakeup.clear()
            if sub.pending or sub.resync:
                sub.restart()
                self.mark(w)
            else:
                await sub.wakeup.wait()

    async def _read_notices(self, sub: Subscription) -> None:
        """A shard's notices: a new run or a new state (follow it while it goes)."""
        while True:
            sub.wakeup.clear()
            if sub.resync:
                sub.restart()
                for w in list(self._follows):
                    self.mark(w)
            live = sub.take()
            if live is None:
                await sub.wakeup.wait()
                continue
            for frame in live.events():
                try:
                    notice = json.loads(bytes(frame.json or b""))
                    w, state = notice["workflow_id"], notice["state"]
                except (ValueError, KeyError, TypeError):
                    continue
                if state not in TERMINAL_STATES:
                    try:
                        await self._follow(w)
                    except RedisError as exc:
                        logger.info("overview: cannot follow %s: %s", w, exc)
                self.mark(w)

    def mark(self, workflow_id: str) -> None:
        self._dirty.add(workflow_id)
        self._kick.set()

    async def _tick(self) -> None:
        """Summaries of the runs marked since, each at most every MIN_INTERVAL."""
        loop = asyncio.get_running_loop()
        while True:
            self._kick.clear()
            if not self._dirty:
                await self._kick.wait()
                continue
            now = loop.time()
            due = [w for w in self._dirty if self._sent_at.get(w, -1e9) + MIN_INTERVAL <= now]
            if not due:
                soonest = min(self._sent_at.get(w, now) for w in self._dirty) + MIN_INTERVAL
                await asyncio.sleep(max(soonest - now, 0.01))
                continue
            self._dirty.difference_update(due)
            # A run estimated within ETA_REUSE_SECONDS keeps that estimate's finish (counted
            # down): a new estimate per event of 1,000 busy runs would take a core.
            fresh = {
                w: self._etas.get(w)
                for w in due
                if w in self._etas and self._estimated_at.get(w, -1e9) + ETA_REUSE_SECONDS > now
            }
            # The runs that need no new estimate first, in one batch; the others in small
            # ones, so that frames keep flowing while estimates are made.
            stale = [w for w in due if w not in fresh]
            step = ESTIMATES_PER_BATCH
            batches = [list(fresh), *(stale[i : i + step] for i in range(0, len(stale), step))]
            for batch in batches:
                if batch:
                    await self._summarize(batch, fresh, now)

    async def _summarize(
        self, batch: list[str], fresh: dict[str, float | None], now: float
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            found = await summaries(self.redis, self.tracker, batch, finishes=fresh)
        except RedisError as exc:
            logger.info("overview: summaries failed (%s); retrying", exc)
            self._dirty.update(batch)
            await asyncio.sleep(MIN_INTERVAL)
            return
        for w in batch:
            summary = found.get(w)
            if summary is None:
                await self._unfollow(w)  # expired
                continue
            if w not in fresh:
                self._estimated_at[w] = now
            self._publish(w, summary, loop.time())
            if summary["state"] in TERMINAL_STATES:
                await self._unfollow(w)

    def _publish(self, workflow_id: str, summary: wire.RunSummary, now: float) -> None:
        eta = summary.get("estimated_remaining_seconds")
        finish = None if eta is None else time.time() + float(eta)  # epoch: see summaries()
        last_finish = self._etas.get(workflow_id)
        eta_moved = (finish is None) != (last_finish is None) or (
            finish is not None and last_finish is not None and abs(finish - last_finish) >= 0.5
        )
        old = self._shown.get(workflow_id)
        if not changed(old, summary, eta_moved=eta_moved):
            return
        self._shown[workflow_id] = summary
        self._shown.move_to_end(workflow_id)
        while len(self._shown) > SHOWN_MAX:
            gone, _ = self._shown.popitem(last=False)
            self._etas.pop(gone, None)
            self._sent_at.pop(gone, None)
            self._estimated_at.pop(gone, None)
        self._etas[workflow_id] = finish
        self._sent_at[workflow_id] = now
        frame = run_frame(summary)
        for client in self.clients:
            # A run that leaves a client's filter (a RUNNING run that completes) is sent
            # once more, so that a live list can drop it.
            if client.wants(summary) or (old is not None and client.wants(old)):
                client.offer(frame)
                self.on_frame()

    def seen(self, summary: wire.RunSummary) -> None:
        """A summary a client got in its first page: changes are compared with it."""
        w = summary["workflow_id"]
        if w not in self._shown:
            self._shown[w] = summary

    async def _poll_watchers(self) -> None:
        while True:
            await asyncio.sleep(WATCHERS_SECONDS)
            ids = list(dict.fromkeys([*self._follows, *self._shown]))
            if not ids:
                continue
            try:
                counts = await watchers(self.redis, ids)
            except RedisError:
                continue
            for w, n in counts.items():
                shown = self._shown.get(w)
                if shown is not None and shown.get("watchers") != n:
                    self.mark(w)


async def overview_stream(
    request: web.Request,
    states: Sequence[str],
    definition_id: str | None,
    limit: int,
    readable: Sequence[str] | None,
) -> web.StreamResponse:
    """The live overview for one client (see the module's docstring)."""
    from server.views import sse_response

    app = request.app
    registry = app[app_keys.streams_key]
    handle = registry.acquire()  # StreamsFull: 503 too-many-streams
    connections.hold_stream(request, handle.client_left)
    client = OverviewClient(
        frozenset(states), definition_id, None if readable is None else frozenset(readable)
    )
    handle.wakeup = client.wakeup
    feed = app[app_keys.overview_key]
    gauge = app[app_keys.metrics_key].open_streams.labels("overview")
    gauge.inc()
    beat: Heartbeat | None = None
    response: web.StreamResponse | None = None
    try:
        # Registered before the first page is read: a change meanwhile comes after it.
        await feed.add(client)
        first, _ = await list_page(
            app[app_keys.runs_key],
            app[app_keys.tracker_key],
            states=states,
            definition_id=definition_id,
            limit=limit,
            readable=readable,
        )
        response = await sse_response(request)
        for summary in first:
            feed.seen(summary)
        if first:
            await response.write(b"".join(run_frame(s) for s in first))
        client.frames = not_older(client.frames, first)
        beat = Heartbeat(client.wakeup, app[app_keys.settings_key].heartbeat_seconds)
        while not handle.stopping and not client.overflowed:
            client.wakeup.clear()
            if client.frames:
                frames, client.frames = client.frames, []
                await response.write(b"".join(frames))
                beat.wrote()
            elif beat.due:
                await response.write(sse.KEEP_ALIVE)
                beat.wrote()
            else:
                await client.wakeup.wait()
        if handle.retry_ms is not None:
            await response.write(sse.encode(retry=handle.retry_ms))
        return response
    except (ConnectionResetError, ConnectionError):
        return response if response is not None else web.Response(status=204)
    finally:
        if beat is not None:
            beat.cancel()
        gauge.dec()
        registry.release(handle)
        connections.release_stream(request)
        await feed.remove(client)
