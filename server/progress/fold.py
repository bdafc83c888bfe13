"""Progress as a pure fold of events into state (no I/O, clock passed in).

Decisions the SPEC leaves open, made here:

- `started_at` is the earliest timestamp of an event showing the run at work: a
  `workflow_state_changed` to RUNNING or any node event. A plan or a CREATED/PENDING
  state does not start the clock.
- Without a plan every node seen counts in the totals (`total_known` false). With a
  plan, a node outside it is still tracked (it shows in `running`, its duration feeds
  the estimate and the history) but is left out of `total_nodes` and of the completed,
  failed and skipped counts, so the percentage stays "k of the planned n".
- A new plan replaces the old one: node states are kept, nodes only planned before are
  dropped, and an identical plan sent again changes nothing.
- A node's latest event decides its state: `node_started` after a failure is a retry (a
  new attempt); `node_started` for a running node is a duplicate and ignored;
  `node_progress` for a node never started marks it running.
- The workflow state is null until a `workflow_state_changed` arrives; node states are
  facts from events and are not rewritten by a terminal state (a run may be resumed).
- Durations enter the history when the run reaches a terminal state (`history_items`),
  so the history holds previous runs only and this run's nodes are not compared with
  themselves; a failed attempt is counted as it happens (the ETA does not read it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import assert_never

from server.models import (
    TERMINAL_STATES,
    Event,
    NodeCompleted,
    NodeFailed,
    NodeProgress,
    NodeSkipped,
    NodeStarted,
    State,
    WorkflowPlanned,
    WorkflowStateChanged,
)
from server.progress.history import FAILED_ATTEMPT

PENDING = "pending"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
SKIPPED = "skipped"
STATUSES = (PENDING, RUNNING, COMPLETED, FAILED, SKIPPED)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)


_US = 1_000_000


@dataclass(slots=True)
class NodeState:
    """What is known of one node: its latest state, its latest attempt and its plan entry."""

    status: str = PENDING
    attempts: int = 0
    started_us: int | None = None
    finished_us: int | None = None
    duration_us: int | None = None
    node_name: str | None = None
    node_type: str | None = None
    depends_on: list[str] = field(default_factory=list)
    index: int = -1  # position in the plan, -1 when not planned
    seen: bool = False  # a node event named it (not only the plan)
    recorded: bool = False  # its duration already went into the history

    @property
    def planned(self) -> bool:
        """True when the current plan names this node."""
        return self.index >= 0


def _zero_counts() -> dict[str, int]:
    return dict.fromkeys(STATUSES, 0)


@dataclass(slots=True)
class FoldState:
    """Everything progress needs, kept incrementally so no event needs a full scan."""

    nodes: dict[str, NodeState] = field(default_factory=dict)
    plan: list[str] = field(default_factory=list)
    plan_known: bool = False
    plan_version: int = 0  # bumped when the plan changes; percentages may restart then
    has_deps: bool = False  # some planned node has depends_on
    definition_id: str | None = None
    max_concurrency: int | None = None
    state: State | None = None
    started_us: int | None = None
    ended_us: int | None = None
    updated_us: int | None = None
    counts: dict[str, int] = field(default_factory=_zero_counts)  # counted nodes only
    total: int = 0
    running: dict[str, None] = field(default_factory=dict)  # every running node, start order
    seq: int = 0  # events folded
    failed_attempts: int = 0
    clock_us: int | None = None  # latest timestamp seen, for the parallelism integral
    busy_us: int = 0  # integral of the number of running nodes over time
    active_us: int = 0  # time with at least one node running
    peak_running: int = 0

    @property
    def terminal(self) -> bool:
        """True in COMPLETED, FAILED or CANCELLED."""
        return self.state in TERMINAL_STATES

    def counted(self, node: NodeState) -> bool:
        """Whether a node counts in the totals: planned ones, or all without a plan."""
        return node.planned or not self.plan_known


def new_state() -> FoldState:
    """The state before any event."""
    return FoldState()


# ---------------------------------------------------------------------------- fold


def _event_us(event: Event) -> int:
    if event.timestamp is None:
        raise ValueError("an event must have its timestamp filled in before it is folded")
    return (event.timestamp - _EPOCH) // _ONE_US


def _advance_clock(state: FoldState, ts: int) -> None:
    """Integrate the number of running nodes up to `ts` (observed parallelism)."""
    if state.clock_us is None:
        state.clock_us = ts
    elif ts > state.clock_us:
        dt = ts - state.clock_us
        state.busy_us += len(state.running) * dt
        if state.running:
            state.active_us += dt
        state.clock_us = ts


def starts_clock(event: Event) -> bool:
    """Whether `event` shows the run at work (its timestamp may be `started_at`)."""
    if isinstance(event, WorkflowStateChanged):
        return event.to_state == "RUNNING"
    return not isinstance(event, WorkflowPlanned)


def _mark_started(state: FoldState, ts: int) -> None:
    if state.started_us is None or ts < state.started_us:
        state.started_us = ts


def _node(state: FoldState, node_id: str) -> NodeState:
    node = state.nodes.get(node_id)
    if node is None:
        node = NodeState()
        state.nodes[node_id] = node
        if not state.plan_known:
            state.total += 1
            state.counts[PENDING] += 1
    node.seen = True
    return node


def _set_status(state: FoldState, node_id: str, node: NodeState, status: str) -> None:
    old = node.status
    if old == status:
        return
    if state.counted(node):
        state.counts[old] -= 1
        state.counts[status] += 1
    if old == RUNNING:
        del state.running[node_id]
    if status == RUNNING:
        state.running[node_id] = None
        state.peak_running = max(state.peak_running, len(state.running))
    node.status = status


def _names(node: NodeState, name: str | None, node_type: str | None) -> None:
    if name is not None:
        node.node_name = name
    if node_type is not None:
        node.node_type = node_type


def _start(state: FoldState, node_id: str, node: NodeState, ts: int) -> None:
    node.attempts += 1
    node.started_us = ts
    node.finished_us = None
    node.duration_us = None
    node.recorded = False
    _set_status(state, node_id, node, RUNNING)


def _finish(
    state: FoldState, node_id: str, node: NodeState, status: str, ts: int, duration_ms: int | None
) -> None:
    if status == COMPLETED and node.status != COMPLETED:
        node.recorded = False
    if status != SKIPPED:
        node.attempts = max(node.attempts, 1)  # it ran even if its start went unreported
    node.finished_us = ts
    if duration_ms is not None:
        node.duration_us = duration_ms * 1000
    elif node.status == RUNNING and node.started_us is not None and ts >= node.started_us:
        node.duration_us = ts - node.started_us
    else:
        node.duration_us = None
    _set_status(state, node_id, node, status)


def _recount(state: FoldState) -> None:
    counts = _zero_counts()
    total = 0
    for node in state.nodes.values():
        if state.counted(node):
            counts[node.status] += 1
            total += 1
    state.counts = counts
    state.total = total


def _apply_plan(state: FoldState, event: WorkflowPlanned) -> None:
    new_ids = [n.node_id for n in event.nodes]
    changed = not state.plan_known or state.plan != new_ids
    wanted = set(new_ids)
    for node_id in state.plan:
        if node_id not in wanted:
            node = state.nodes[node_id]
            node.index = -1
            node.depends_on = []
            if not node.seen:
                del state.nodes[node_id]
    has_deps = False
    for index, planned in enumerate(event.nodes):
        found = state.nodes.get(planned.node_id)
        node = found if found is not None else NodeState()
        state.nodes[planned.node_id] = node
        deps = list(planned.depends_on or ())
        changed = changed or deps != node.depends_on
        has_deps = has_deps or bool(deps)
        node.index = index
        node.depends_on = deps
        if node.node_name is None:
            node.node_name = planned.node_name
        if node.node_type is None:
            node.node_type = planned.node_type
    state.plan = new_ids
    state.plan_known = True
    state.has_deps = has_deps
    state.definition_id = event.definition_id
    state.max_concurrency = event.max_concurrency
    _recount(state)
    if changed:
        state.plan_version += 1


def fold(state: FoldState, event: Event) -> FoldState:
    """Apply one event: updates `state` in place and returns it, O(1) per node event."""
    ts = _event_us(event)
    state.seq += 1
    _advance_clock(state, ts)
    state.updated_us = ts
    match event:
        case WorkflowPlanned():
            _apply_plan(state, event)
        case WorkflowStateChanged():
            state.state = event.to_state
            if event.is_terminal:
                state.ended_us = ts
                # history_items() has just listed these; mark them so a resumed run that
                # ends again does not record them twice.
                for node in state.nodes.values():
                    if node.status == COMPLETED:
                        node.recorded = True
            else:
                state.ended_us = None
        case NodeStarted():
            node = _node(state, event.node_id)
            _names(node, event.node_name, event.node_type)
            if node.status != RUNNING:
                _start(state, event.node_id, node, ts)
        case NodeProgress():
            node = _node(state, event.node_id)
            if node.status == PENDING:
                _start(state, event.node_id, node, ts)
        case NodeCompleted():
            node = _node(state, event.node_id)
            _names(node, event.node_name, event.node_type)
            _finish(state, event.node_id, node, COMPLETED, ts, event.duration_ms)
        case NodeFailed():
            node = _node(state, event.node_id)
            _names(node, event.node_name, event.node_type)
            if node.status != FAILED:
                state.failed_attempts += 1
            _finish(state, event.node_id, node, FAILED, ts, event.duration_ms)
        case NodeSkipped():
            node = _node(state, event.node_id)
            _finish(state, event.node_id, node, SKIPPED, ts, None)
        case _:
            assert_never(event)
    if starts_clock(event):
        _mark_started(state, ts)
    return state


def history_items(
    state_before: FoldState, event: Event
) -> list[tuple[str | None, str, str | None, float]]:
    """Durations to pass to history.record() for `event`; call it before folding the event.

    When `event` ends the run: every completed node not yet recorded, as (definition_id,
    node_id, node_type, seconds). For a `node_failed` (not a repeat of one): the failed
    attempt, at once, with seconds FAILED_ATTEMPT (failures feed the statistics, not the
    ETA, so they need not wait for the end of the run).
    """
    if isinstance(event, NodeFailed):
        before = state_before.nodes.get(event.node_id)
        if before is not None and before.status == FAILED:
            return []  # counted once, as fold counts failed_attempts
        kind = event.node_type or (before.node_type if before is not None else None)
        if state_before.definition_id is None and kind is None:
            return []
        return [(state_before.definition_id, event.node_id, kind, FAILED_ATTEMPT)]
    if not isinstance(event, WorkflowStateChanged) or not event.is_terminal:
        return []
    return [
        (state_before.definition_id, node_id, node.node_type, node.duration_us / _US)
        for node_id, node in state_before.nodes.items()
        if node.status == COMPLETED and not node.recorded and node.duration_us is not None
    ]


def node_types(state: FoldState) -> list[str]:
    """The distinct node types of the run, in node order."""
    return list(dict.fromkeys(n.node_type for n in state.nodes.values() if n.node_type))


def history_keys(state: FoldState) -> tuple[str | None, list[str], list[str]]:
    """(definition_id, node_ids, node_types) to pass to history.load()."""
    return state.definition_id, list(state.nodes), node_types(state)
