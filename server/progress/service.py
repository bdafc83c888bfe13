"""Progress as served: the stored fold, the duration history, and what was last shown."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server import progress
from server.progress import history
from server.redis_client import AnyRedis
from server.store import Appended, Store

if TYPE_CHECKING:
    from server import wire

# A fold state of more nodes than this is parsed and estimated in a worker thread: the
# estimate of a 10,000-node plan costs a few hundred ms of CPU, which on the event loop
# would stall every stream of the process. The thread gives the loop the GIL back every
# switch interval (5 ms); smaller states are cheaper inline than a thread hop.
THREAD_NODES = 300
# An estimate is kept until the workflow changes, or until it is older than this many times
# what it cost to compute (a polled workflow spends at most about 1/20 of a core on its
# ETA), and at least ETA_MIN_AGE seconds: polls between events cost no estimate.
ETA_COST_FACTOR = 20.0
ETA_MIN_AGE = 0.25
# Workflows whose state and estimate a process keeps, least recently polled out first.
CACHE_WORKFLOWS = 256


@dataclass(slots=True)
class _Estimate:
    """One workflow's fold state as of `last_id`, and its ETA as of `at`."""

    last_id: str | None
    state: progress.FoldState
    view: history.HistoryView
    raw: float | None  # estimated_remaining_seconds at `at`, before smoothing
    at: float  # the service clock when `raw` was computed
    cost: float  # seconds of CPU the load and estimate took
    # The futures `raw` comes from: the predicted schedule is read from them when asked
    # for (GET /workflows/{id}/schedule), never simulated again.
    forecast: progress.Forecast


def _estimate(
    state: progress.FoldState, view: history.HistoryView, now: float
) -> tuple[progress.Forecast, float]:
    """The raw ETA with its futures, and what it cost (pure; may run in a worker thread)."""
    started = time.perf_counter()
    forecast = progress.forecast(state, view, now)
    return forecast, time.perf_counter() - started


class ProgressService:
    """Reads progress in O(1) round trips, whatever the length of the history."""

    def __init__(
        self,
        store: Store,
        redis: AnyRedis,
        *,
        history_ttl: int,
        clock: Callable[[], float] = time.time,
        history_prefix: str = "wfsse",
    ) -> None:
        self.store = store
        self.redis = redis
        self.history_ttl = history_ttl
        self.clock = clock
        self.history_prefix = history_prefix
        self._cache: OrderedDict[str, _Estimate] = OrderedDict()
        # One load or estimate per workflow at a time: concurrent pollers share it.
        self._inflight: dict[str, asyncio.Future[_Estimate | None]] = {}

    async def snapshot(
        self,
        workflow_id: str,
        *,
        head: tuple[str | None, bytes | None] | None = None,
        save: bool = True,
    ) -> wire.Progress | None:
        """The SPEC's progress object, or None for an unknown workflow.

        `head`: the last event id and what was last shown, when the caller read them already
        (a run list reads them for a whole page in one pipeline). `save=False`: what is shown
        is not remembered (a list is no poll: the next poll smooths from the last one).
        """
        current = await self._current(workflow_id, head=head, save=save)
        return None if current is None else current[1]

    async def schedule(self, workflow_id: str) -> wire.Schedule | None:
        """Each node's real and predicted times, with the progress figures of the same
        moment (the right edge is its `estimated_completion_at`); None when unknown."""
        current = await self._current(workflow_id)
        if current is None:
            return None
        estimate, snap, now = current
        if len(estimate.forecast.ids) > THREAD_NODES:
            await asyncio.to_thread(estimate.forecast.schedule)  # then cached in it
        nodes = progress.schedule_nodes(
            estimate.state,
            estimate.forecast,
            estimate.at,
            now,
            snap["estimated_remaining_seconds"],
        )
        return {
            "workflow_id": snap["workflow_id"],
            "state": snap["state"],
            "last_event_id": snap["last_event_id"],
            "started_at": snap["started_at"],
            "elapsed_seconds": snap["elapsed_seconds"],
            "estimated_remaining_seconds": snap["estimated_remaining_seconds"],
            "estimated_completion_at": snap["estimated_completion_at"],
            "as_of": progress.format_epoch(now),
            "nodes": nodes,
        }

    async def _current(
        self,
        workflow_id: str,
        *,
        head: tuple[str | None, bytes | None] | None = None,
        save: bool = True,
    ) -> tuple[_Estimate, wire.Progress, float] | None:
        """The cached estimate (refreshed when due), the progress object from it, and now."""
        if head is None:
            head = await self.store.progress_head(workflow_id)
        if head is None:
            return None
        last_id, shown_raw = head
        now = self.clock()
        cached = self._cache.get(workflow_id)
        if cached is None or cached.last_id != last_id or self._stale(cached, now):
            cached = await self._refresh(workflow_id, last_id, now)
            if cached is None:
                return None
        else:
            self._cache.move_to_end(workflow_id)
        estimate = cached
        shown = progress.loads_shown(shown_raw) if shown_raw else None

        def remaining(
            state: progress.FoldState, view: history.HistoryView, at: float
        ) -> float | None:
            # Between estimates the predicted finish stays where it was: time left counts
            # down with the clock (never under the SPEC's 0.1 while running).
            if estimate.raw is None:
                return None
            return max(estimate.raw - (at - estimate.at), progress.MIN_REMAINING)

        snap, new_shown = progress.snapshot(
            estimate.state,
            workflow_id=workflow_id,
            last_event_id=estimate.last_id,
            history=estimate.view,
            now=now,
            shown=shown,
            estimate=remaining,
        )
        if save and new_shown != shown:
            await self.store.save_shown(workflow_id, progress.dumps_shown(new_shown))
        return estimate, snap, now

    def _stale(self, cached: _Estimate, now: float) -> bool:
        if cached.raw is None or cached.state.terminal:
            return False  # nothing that time changes: it waits for the next event
        return now - cached.at >= max(ETA_MIN_AGE, ETA_COST_FACTOR * cached.cost)

    async def _refresh(self, workflow_id: str, last_id: str | None, now: float) -> _Estimate | None:
        """Load (when the workflow changed) and estimate again; shared by concurrent polls."""
        inflight = self._inflight.get(workflow_id)
        if inflight is not None:
            return await asyncio.shield(inflight)
        future: asyncio.Future[_Estimate | None] = asyncio.get_running_loop().create_future()
        self._inflight[workflow_id] = future
        try:
            result = await self._compute(workflow_id, last_id, now)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: a poll that shares it re-raises it itself
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._inflight[workflow_id]

    async def _compute(self, workflow_id: str, last_id: str | None, now: float) -> _Estimate | None:
        cached = self._cache.get(workflow_id)
        load_cost = 0.0
        if cached is not None and cached.last_id == last_id:
            state, view = cached.state, cached.view  # unchanged: only time moved on
        else:
            started = time.perf_counter()
            stored = await self.store.load_progress(workflow_id, parse=self._offload)
            if stored is None:
                self._cache.pop(workflow_id, None)
                return None
            state, last_id = stored.state, stored.last_event_id
            definition_id, node_ids, node_types = progress.history_keys(state)
            view = await history.load(
                self.redis, definition_id, node_ids, node_types, prefix=self.history_prefix
            )
            load_cost = time.perf_counter() - started
        if len(state.nodes) > THREAD_NODES:
            forecast, cost = await asyncio.to_thread(_estimate, state, view, now)
        else:
            forecast, cost = _estimate(state, view, now)
        estimate = _Estimate(
            last_id, state, view, forecast.remaining, now, cost + load_cost, forecast
        )
        self._cache[workflow_id] = estimate
        self._cache.move_to_end(workflow_id)
        while len(self._cache) > CACHE_WORKFLOWS:
            self._cache.popitem(last=False)
        return estimate

    @staticmethod
    async def _offload(parse: Callable[[], progress.FoldState], nodes: int) -> progress.FoldState:
        """Parse a big stored state in a worker thread, a small one inline."""
        return await asyncio.to_thread(parse) if nodes > THREAD_NODES else parse()

    async def record_history(self, workflow_id: str, appended: Appended) -> None:
        """After an append: durations of a finished run go into the history."""
        if appended.history:
            await history.record(
                self.redis,
                appended.history,
                ttl_seconds=self.history_ttl,
                prefix=self.history_prefix,
            )
