"""Workflow events as the tests and benches POST them: plain dicts, the fields each needs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# The usual last event of a run. A dict shared by every importer: copy it to change it.
DONE = {"event_type": "workflow_state_changed", "to_state": "COMPLETED"}


def started(node: str, **extra: Any) -> dict[str, Any]:
    return {"event_type": "node_started", "node_id": node, **extra}


def completed(node: str, **extra: Any) -> dict[str, Any]:
    return {"event_type": "node_completed", "node_id": node, **extra}


def state(to: str) -> dict[str, Any]:
    return {"event_type": "workflow_state_changed", "to_state": to}


def plan(definition: str, *nodes: str) -> dict[str, Any]:
    """A workflow_planned of `definition` with these node ids (no types, no edges)."""
    return {
        "event_type": "workflow_planned",
        "definition_id": definition,
        "nodes": [{"node_id": n} for n in nodes],
    }


def short_run(n: int = 4) -> list[dict[str, Any]]:
    """A small plan with Korean names, a failure and its retry, a skip, then COMPLETED."""
    names = ["데이터 조회", "품질 판정", "Build report", "알림"]
    nodes = [
        {
            "node_id": f"n{i}",
            "node_name": names[i % len(names)],
            "node_type": "task",
            "depends_on": [f"n{i - 1}"] if i else [],
        }
        for i in range(n)
    ]
    events: list[dict[str, Any]] = [
        {"event_type": "workflow_planned", "nodes": nodes, "definition_id": "watch-test"},
        {"event_type": "workflow_state_changed", "from_state": "PENDING", "to_state": "RUNNING"},
    ]
    for i in range(n):
        node = {"node_id": f"n{i}", "node_name": nodes[i]["node_name"]}
        events.append({"event_type": "node_started", **node})
        if i == 1:
            events.append({"event_type": "node_failed", **node, "error": "연결 시간 초과"})
            events.append({"event_type": "node_started", **node})
        events.append({"event_type": "node_progress", "node_id": f"n{i}", "fraction": 0.5})
        if i == n - 2:
            events.append(
                {"event_type": "node_skipped", "node_id": f"n{i}", "reason": "not needed"}
            )
        else:
            events.append({"event_type": "node_completed", **node, "duration_ms": 1200 + i})
    events.append(
        {"event_type": "workflow_state_changed", "from_state": "RUNNING", "to_state": "COMPLETED"}
    )
    return events


def iso(seconds: float) -> str:
    """An explicit event timestamp: RFC 3339 in UTC, to the millisecond."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + (
        f".{int(seconds % 1 * 1000):03d}Z"
    )


# A diamond then a tail: a -> (b, c) -> d -> e.
DIAMOND: dict[str, list[str]] = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": ["d"]}


def dag_plan(
    definition: str, ts: float, name: Callable[[str], str], deps: dict[str, list[str]] = DIAMOND
) -> dict[str, Any]:
    """A workflow_planned at `ts` with edges, names and a node type per node (unique to the
    definition, so its history is the test's own)."""
    nodes = [
        {"node_id": n, "node_name": name(n), "node_type": f"{definition}-{n}", "depends_on": d}
        for n, d in deps.items()
    ]
    return {
        "event_type": "workflow_planned",
        "definition_id": definition,
        "nodes": nodes,
        "timestamp": iso(ts),
    }


def timed(kind: str, node_id: str, ts: float, **extra: Any) -> dict[str, Any]:
    """A node event with an explicit timestamp."""
    return {"event_type": kind, "node_id": node_id, "timestamp": iso(ts), **extra}
