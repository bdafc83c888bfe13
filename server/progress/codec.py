"""How fold state is stored in Redis: compact JSON parts (meta, plan, one per node)
that an append can rewrite selectively, and the whole state in one document.
"""

from __future__ import annotations

import json
from typing import Any, assert_never

import pydantic_core

from server.models import (
    Event,
    NodeCompleted,
    NodeFailed,
    NodeProgress,
    NodeSkipped,
    NodeStarted,
    WorkflowPlanned,
    WorkflowStateChanged,
)
from server.progress.fold import STATUSES, FoldState, NodeState

_STATUS_CODE = {s: i for i, s in enumerate(STATUSES)}


def _node_row(n: NodeState) -> list[Any]:
    return [
        _STATUS_CODE[n.status],
        n.attempts,
        n.started_us,
        n.finished_us,
        n.duration_us,
        n.node_name,
        n.node_type,
        n.depends_on,
        n.index,
        int(n.seen) | int(n.recorded) << 1,
        0,  # was the fold order of the latest start; `running` holds that order (see fold)
    ]


def _node_from_row(row: list[Any]) -> NodeState:
    status, attempts, started, finished, duration, name, ntype, deps, index, flags, _ = row
    return NodeState(
        status=STATUSES[status],
        attempts=attempts,
        started_us=started,
        finished_us=finished,
        duration_us=duration,
        node_name=name,
        node_type=ntype,
        depends_on=deps,
        index=index,
        seen=bool(flags & 1),
        recorded=bool(flags & 2),
    )


def _dumps(doc: Any) -> bytes:
    # The same compact UTF-8 JSON as json.dumps(separators=(",", ":"), ensure_ascii=False),
    # in a fifth of the time: two of these run per append.
    return pydantic_core.to_json(doc)


# The state is stored in parts, so an append reads and writes only the nodes its events
# touch: `meta` (everything but the nodes and the plan), `plan`, and one part per node.


def dumps_meta(state: FoldState) -> bytes:
    """The workflow-level part of the state: small, whatever the number of nodes."""
    return _dumps(
        {
            "v": 1,
            "pk": state.plan_known,
            "pv": state.plan_version,
            "hd": state.has_deps,
            "d": state.definition_id,
            "mc": state.max_concurrency,
            "s": state.state,
            "t": [state.started_us, state.ended_us, state.updated_us, state.clock_us],
            "c": [state.counts[s] for s in STATUSES],
            "tot": state.total,
            "r": list(state.running),
            "q": state.seq,
            "x": [state.failed_attempts, state.busy_us, state.active_us, state.peak_running],
        }
    )


def dumps_plan(state: FoldState) -> bytes:
    """The planned node ids, in plan order."""
    return _dumps(state.plan)


def dumps_node(node: NodeState) -> bytes:
    """One node's part."""
    return _dumps(_node_row(node))


def loads_parts(meta: bytes, plan: bytes | None, nodes: dict[str, bytes]) -> FoldState:
    """A state from its parts; with only some nodes and no plan it is a partial state,
    enough to fold the events whose `touched_nodes` were loaded."""
    doc = json.loads(meta)
    if not isinstance(doc, dict) or doc.get("v") != 1:
        raise ValueError("not a progress state of version 1")
    started_us, ended_us, updated_us, clock_us = doc["t"]
    failed_attempts, busy_us, active_us, peak = doc["x"]
    return FoldState(
        nodes={node_id: _node_from_row(json.loads(raw)) for node_id, raw in nodes.items()},
        plan=json.loads(plan) if plan else [],
        plan_known=doc["pk"],
        plan_version=doc["pv"],
        has_deps=doc["hd"],
        definition_id=doc["d"],
        max_concurrency=doc["mc"],
        state=doc["s"],
        started_us=started_us,
        ended_us=ended_us,
        updated_us=updated_us,
        counts=dict(zip(STATUSES, doc["c"], strict=True)),
        total=doc["tot"],
        running=dict.fromkeys(doc["r"]),
        seq=doc["q"],
        failed_attempts=failed_attempts,
        clock_us=clock_us,
        busy_us=busy_us,
        active_us=active_us,
        peak_running=peak,
    )


def touched_nodes(event: Event) -> list[str] | None:
    """The nodes folding `event` reads or changes; None when it needs the whole state."""
    match event:
        case WorkflowPlanned():
            return None
        case WorkflowStateChanged():
            return None if event.is_terminal else []
        case NodeStarted() | NodeProgress() | NodeCompleted() | NodeFailed() | NodeSkipped():
            return [event.node_id]
        case _:
            assert_never(event)


def dumps_state(state: FoldState) -> bytes:
    """Compact JSON of the whole state; loads_state() gives back an equal object."""
    return _dumps(
        {
            "m": json.loads(dumps_meta(state)),
            "p": state.plan,
            "n": [[node_id, *_node_row(n)] for node_id, n in state.nodes.items()],
        }
    )


def loads_state(data: bytes) -> FoldState:
    """The state written by dumps_state()."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or not {"m", "p", "n"} <= doc.keys():
        raise ValueError("not a progress state of version 1")
    state = loads_parts(_dumps(doc["m"]), _dumps(doc["p"]), {})
    state.nodes = {row[0]: _node_from_row(row[1:]) for row in doc["n"]}
    return state
