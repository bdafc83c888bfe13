"""Workflow events as the tests and benches POST them: plain dicts, the fields each needs."""

from __future__ import annotations

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
