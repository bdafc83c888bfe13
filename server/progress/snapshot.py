"""What a poll shows: the progress object built from fold state and the ETA, with the
shown finish time smoothed between polls, and each node's real and predicted times.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, cast

from server.models import (
    format_timestamp,
)
from server.progress.estimate import MIN_REMAINING, Forecast, eta
from server.progress.fold import (
    _EPOCH,
    _US,
    COMPLETED,
    FAILED,
    RUNNING,
    SKIPPED,
    FoldState,
    NodeState,
)
from server.progress.history import HistoryView

if TYPE_CHECKING:
    from server import wire

TAU_FRACTION = 0.03  # smoothing time constant, as a share of the estimated total time
TAU_MIN = 1.0
TAU_MAX = 600.0


@dataclass
class Shown:
    """What was last shown, so that shown figures are smoothed and never go back."""

    plan_version: int = 0
    percentage: float = 0.0  # highest count-based percentage shown under plan_version
    time_percentage: float | None = None  # highest shown while not terminal
    finish_at: float | None = None  # smoothed predicted finish, epoch seconds
    at: float | None = None  # when finish_at was computed
    tau: float | None = None  # smoothing time constant used then, seconds


def dumps_shown(s: Shown) -> bytes:
    """Compact JSON of a Shown."""
    doc = [s.plan_version, s.percentage, s.time_percentage, s.finish_at, s.at, s.tau]
    return json.dumps(doc, separators=(",", ":")).encode()


def loads_shown(b: bytes) -> Shown:
    """The Shown written by dumps_shown()."""
    plan_version, percentage, time_percentage, finish_at, at, tau = json.loads(b)
    return Shown(plan_version, percentage, time_percentage, finish_at, at, tau)


def _iso_us(us: int | None) -> str | None:
    return None if us is None else format_timestamp(_EPOCH + timedelta(microseconds=us))


def format_epoch(seconds: float) -> str:
    """RFC 3339 UTC with milliseconds of an epoch time in seconds."""
    return _iso(seconds)


def _iso(seconds: float) -> str:
    ms = round(seconds * 1000)
    return format_timestamp(_EPOCH + timedelta(milliseconds=ms))


def _smooth(prev: Shown, raw_finish: float, now: float, tau: float) -> float:
    """Move the shown finish time toward the new estimate with time constant `tau`."""
    # A shown finish already passed was wrong: show the new estimate rather than creep
    # up from "0.1 s left".
    if prev.finish_at is None or prev.at is None or prev.finish_at <= now:
        return raw_finish
    alpha = 1.0 - math.exp(-max(now - prev.at, 0.0) / tau)
    return prev.finish_at + alpha * (raw_finish - prev.finish_at)


def snapshot(
    state: FoldState,
    *,
    workflow_id: str,
    last_event_id: str | None,
    history: HistoryView,
    now: float,
    shown: Shown | None,
    estimate: Callable[[FoldState, HistoryView, float], float | None] = eta,
) -> tuple[wire.Progress, Shown]:
    """The SPEC's progress object as of `now`, and what to remember as shown.

    `estimate` gives the raw ETA; the server passes one that reuses an estimate made at the
    last change of the workflow (see tracker.ProgressService).
    """
    prev = shown if shown is not None else Shown()
    terminal = state.terminal
    total = state.total
    done = state.counts[COMPLETED] + state.counts[SKIPPED]
    counted = round(100.0 * done / total, 1) if total else 0.0
    # "Never backwards" holds under one plan; without a plan the total grows as nodes
    # appear, and "1 of 2" must not show as 100 because "1 of 1" once did.
    same_plan = state.plan_known and prev.plan_version == state.plan_version
    floor = max(prev.percentage if same_plan else 0.0, counted)
    percentage = 100.0 if state.state == "COMPLETED" else floor

    elapsed: float | None = None
    if state.started_us is not None:
        end = state.ended_us / _US if terminal and state.ended_us is not None else now
        elapsed = round(max(end - state.started_us / _US, 0.0), 1)

    new = Shown(state.plan_version, floor, prev.time_percentage, None, now, prev.tau)
    remaining: float | None
    time_percentage: float | None
    if terminal:
        remaining, time_percentage = 0.0, 100.0
    else:
        raw = estimate(state, history, now)
        if raw is None:
            remaining, time_percentage = None, None
        else:
            spent = elapsed or 0.0
            tau = min(max(TAU_FRACTION * (spent + raw), TAU_MIN), TAU_MAX)
            new.finish_at = _smooth(prev, now + raw, now, tau)
            new.tau = tau
            remaining = max(round(new.finish_at - now, 1), MIN_REMAINING)
            share = min(round(100.0 * spent / (spent + remaining), 1), 99.9)
            time_percentage = max(share, prev.time_percentage or 0.0)
            new.time_percentage = time_percentage

    # `running` is in start order (fold appends each start), so equal timestamps keep it.
    running_ids = sorted(state.running, key=lambda n: state.nodes[n].started_us or 0)
    running: list[wire.RunningNode] = [
        {
            "node_id": n,
            "node_name": state.nodes[n].node_name,
            "started_at": _iso_us(state.nodes[n].started_us),
        }
        for n in running_ids
    ]
    progress: wire.Progress = {
        "workflow_id": workflow_id,
        "state": state.state,
        "total_nodes": total,
        "total_known": state.plan_known,
        "completed_nodes": state.counts[COMPLETED],
        "failed_nodes": state.counts[FAILED],
        "skipped_nodes": state.counts[SKIPPED],
        "running_nodes": len(running_ids),
        "percentage": percentage,
        "time_percentage": time_percentage,
        "current_node": running_ids[-1] if running_ids else None,
        "running": running,
        "started_at": _iso_us(state.started_us),
        "updated_at": _iso_us(state.updated_us),
        "elapsed_seconds": elapsed,
        "estimated_remaining_seconds": remaining,
        "estimated_completion_at": None if remaining is None else _iso(now + remaining),
        "last_event_id": last_event_id,
    }
    return progress, new


def _node_started_us(node: NodeState) -> int | None:
    if node.started_us is not None:
        return node.started_us
    if node.finished_us is not None and node.duration_us is not None:
        return node.finished_us - node.duration_us  # completed with no start reported
    return None


def schedule_nodes(
    state: FoldState, forecast: Forecast | None, made_at: float, now: float, remaining: float | None
) -> list[wire.ScheduledNode]:
    """Each node's real and predicted times as of `now`, planned nodes in plan order first.

    `forecast` was made at `made_at`; `remaining` is the shown (smoothed) time left of the
    progress object answered at `now`. The predicted times are moved on to `now` (what
    should have started by now starts now) and stretched so that the latest predicted end
    is exactly `now + remaining`, the progress object's `estimated_completion_at`: the
    chart's right edge is the ETA the user reads.
    """
    plan = set(state.plan)
    ids = [*state.plan, *(n for n in state.nodes if n not in plan)]
    predicted: dict[str, tuple[float | None, float]] = {}
    if forecast is not None and remaining is not None and not state.terminal:
        shift = max(now - made_at, 0.0)
        moved = {
            node_id: (None if b is None else max(b - shift, 0.0), max(e - shift, 0.0))
            for node_id, (b, e) in forecast.schedule().items()
        }
        latest = max((e for _, e in moved.values()), default=0.0)
        scale = remaining / latest if latest > 0.0 else 0.0
        for node_id, (b, e) in moved.items():
            until = e * scale if latest > 0.0 else remaining
            predicted[node_id] = (None if b is None else min(b * scale, until), until)
    out: list[wire.ScheduledNode] = []
    for node_id in ids:
        node = state.nodes.get(node_id)
        if node is None:
            continue
        times = predicted.get(node_id)
        begin, end = (None, None) if times is None else times
        out.append(
            {
                "node_id": node_id,
                "node_name": node.node_name,
                "node_type": node.node_type,
                "depends_on": node.depends_on,
                "status": cast("wire.NodeStatus", node.status),
                "attempts": node.attempts,
                "started_at": _iso_us(_node_started_us(node)),
                "finished_at": None if node.status == RUNNING else _iso_us(node.finished_us),
                "expected_start_at": None if begin is None else _iso(now + begin),
                "expected_end_at": None if end is None else _iso(now + end),
            }
        )
    return out
