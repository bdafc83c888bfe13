"""Run summaries: the figures `GET /workflows` and its live overview give per run.

A summary holds the same figures `/progress` gives, as of the answer. A finished run's come
from the small `meta` part of its fold state (its ETA is 0), so a page of finished runs
never loads a plan; a run still going is asked of the progress service, which shares its
cached estimate with the run's pollers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from server import progress
from server.models import format_timestamp
from server.overview.runs import Cursor, RunIndex
from server.progress.parts import META
from server.progress.service import ProgressService
from server.redis_client import AnyRedis
from server.redis_keys import progress_key
from server.streams.watchers import watchers

if TYPE_CHECKING:
    from server import wire

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Runs still going whose progress a page computes at once: a page of 200 running runs does
# not take all of the process's Redis connections (POOL_SIZE) for itself.
SUMMARY_CONCURRENCY = 16


def _iso_us(us: int | None) -> str | None:
    return None if us is None else format_timestamp(_EPOCH + timedelta(microseconds=us))


def _raw(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def meta_summary(
    workflow_id: str,
    state: progress.FoldState,
    shown: progress.Shown | None,
    remaining: float | None = 0.0,
) -> wire.RunSummary:
    """A summary from a run's meta part (pure): what its /progress says when the run is
    finished (`remaining` 0); for a run still going, with the time left given."""
    total = state.total
    done = state.counts[progress.COMPLETED] + state.counts[progress.SKIPPED]
    counted = round(100.0 * done / total, 1) if total else 0.0
    # As progress.snapshot(): the highest percentage shown under this plan is kept.
    same_plan = shown is not None and state.plan_known and shown.plan_version == state.plan_version
    floor = max(shown.percentage if same_plan and shown is not None else 0.0, counted)
    return {
        "workflow_id": workflow_id,
        "definition_id": state.definition_id,
        "state": state.state,
        "total_nodes": total,
        "completed_nodes": state.counts[progress.COMPLETED],
        "failed_nodes": state.counts[progress.FAILED],
        "percentage": 100.0 if state.state == "COMPLETED" else floor,
        "estimated_remaining_seconds": remaining,
        "started_at": _iso_us(state.started_us),
        "updated_at": _iso_us(state.updated_us),
        "watchers": 0,
    }


def from_progress(snap: wire.Progress, definition_id: str | None) -> wire.RunSummary:
    """A summary from a /progress object (the definition is not one of its keys)."""
    return {
        "workflow_id": snap["workflow_id"],
        "definition_id": definition_id,
        "state": snap["state"],
        "total_nodes": snap["total_nodes"],
        "completed_nodes": snap["completed_nodes"],
        "failed_nodes": snap["failed_nodes"],
        "percentage": snap["percentage"],
        "estimated_remaining_seconds": snap["estimated_remaining_seconds"],
        "started_at": snap["started_at"],
        "updated_at": snap["updated_at"],
        "watchers": 0,
    }


async def summaries(
    redis: AnyRedis,
    tracker: ProgressService,
    workflow_ids: Sequence[str],
    *,
    finishes: Mapping[str, float | None] | None = None,
    now: float | None = None,
) -> dict[str, wire.RunSummary]:
    """Summaries of the runs that still exist, by id: a pipeline of the small parts, the
    progress service for the runs still going, and the watcher counts (two round trips).

    `finishes`: runs still going whose predicted finish (epoch seconds, None: no ETA) the
    caller computed lately; their summaries come from the small parts with the time left
    counted down to that finish, not from a new estimate (the live overview's way to
    follow 1,000 busy runs on a core). The rest are estimated as /progress does.
    """
    ids = list(dict.fromkeys(workflow_ids))
    if not ids:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for w in ids:
            pipe.hmget(progress_key(w), [META, "shown", "last"])
        rows = await pipe.execute()
    out: dict[str, wire.RunSummary] = {}
    going: list[tuple[str, str | None, tuple[str | None, bytes | None]]] = []
    for w, (meta, shown_raw, last) in zip(ids, rows, strict=True):
        if not meta:
            continue  # expired (or not created yet): not listed
        state = progress.loads_parts(_raw(meta), None, {})
        shown_bytes = _raw(shown_raw) if shown_raw else None
        if state.terminal:
            shown = progress.loads_shown(shown_bytes) if shown_bytes else None
            out[w] = meta_summary(w, state, shown)
        elif finishes is not None and w in finishes:
            shown = progress.loads_shown(shown_bytes) if shown_bytes else None
            finish = finishes[w]
            clock = time.time() if now is None else now
            left = None if finish is None else max(round(finish - clock, 1), progress.MIN_REMAINING)
            out[w] = meta_summary(w, state, shown, left)
        else:
            head = (_raw(last).decode() if last else None, shown_bytes)
            going.append((w, state.definition_id, head))
    # The head read above is passed on (no second read per run), and a list does not
    # write what it showed: only polls advance the smoothing.
    gate = asyncio.Semaphore(SUMMARY_CONCURRENCY)

    async def one(w: str, head: tuple[str | None, bytes | None]) -> wire.Progress | None:
        async with gate:
            return await tracker.snapshot(w, head=head, save=False)

    snaps = await asyncio.gather(*(one(w, head) for w, _, head in going))
    for (w, definition_id, _), snap in zip(going, snaps, strict=True):
        if snap is not None:
            out[w] = from_progress(snap, definition_id)
    counts = await watchers(redis, list(out))
    for w, summary in out.items():
        summary["watchers"] = counts.get(w, 0)
    return {w: out[w] for w in ids if w in out}


async def list_page(
    index: RunIndex,
    tracker: ProgressService,
    *,
    states: Sequence[str] = (),
    definition_id: str | None = None,
    limit: int,
    cursor: Cursor | None = None,
    readable: Sequence[str] | None = None,
) -> tuple[list[wire.RunSummary], Cursor | None]:
    """A page of `GET /workflows`: summaries best first, and the cursor after them.

    `readable`: the runs a token may read (None: all). A token lists its runs itself, so the
    page costs the same whatever else the index holds.
    """
    if readable is None:
        listed = await index.page(
            states=states, definition_id=definition_id, limit=limit, cursor=cursor
        )
        ids, nxt = listed.workflow_ids, listed.next
    else:
        ids, nxt = await _readable_page(index, readable, states, definition_id, limit, cursor)
    found = await summaries(index.redis, tracker, ids)
    gone = [w for w in ids if w not in found]
    if gone:  # keys expired before the index entry did: forget them now
        await index.forget(gone)
    return [found[w] for w in ids if w in found], nxt


async def _readable_page(
    index: RunIndex,
    readable: Sequence[str],
    states: Sequence[str],
    definition_id: str | None,
    limit: int,
    cursor: Cursor | None,
) -> tuple[list[str], Cursor | None]:
    """A page of the runs a token names, from their index records, in the index's order."""
    records = await index.records(readable) if readable else {}
    rows = sorted(
        (
            (score, w)
            for w, (score, state, definition) in records.items()
            if (not states or state in states)
            and (definition_id is None or definition == definition_id)
            and (cursor is None or (score, w) < (cursor.score, cursor.workflow_id))
        ),
        reverse=True,
    )
    chosen = rows[:limit]
    at = cursor.at if cursor is not None else int(index.clock() * 1000)
    nxt = Cursor(at, *chosen[-1]) if len(rows) > limit and chosen else None
    return [w for _, w in chosen], nxt
