"""A workflow's fold state in the progress hash, by parts, and this process's cache of it.

The progress hash (redis_keys.progress_key) holds the fold state in parts: `meta`, `plan`
and one `n:<node id>` per node, beside `ver` (appends so far) and `last` (last id). An
append reads only the parts its events touch (`read_fields`), folds them (`fold_parts`)
and has the append script write them back under a compare-and-set on `ver` and `last`:
if another process appended in between, the script writes nothing and answers the parts
again, and the append folds once more.

A `View` is what a process knows of one workflow's state as of a `ver`. The process keeps
the views its appends wrote (`ProgressCache`, CACHE_NODES at most), so its next append of
the same workflow reads nothing first: one round trip. It keeps them current from what
other processes' appends publish on the live channel (`ProgressCache.follow`), applied
only onto the exact state it was written over; whatever it misses costs a retry of the
compare-and-set, never a wrong state.

Where another process writes the same workflow (SharedWorkflows), an append of node events
also sends its `Delta`, and the script merges it onto a stale meta part instead of refusing
whenever what the fold read is unchanged (lua/append.lua, "Merging").
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import pydantic_core

from server import progress
from server.models import Event, WorkflowPlanned, WorkflowStateChanged

# Fields of the progress hash besides `ver`, `last` and `shown`: the fold state in parts.
META, PLAN, NODE = "meta", "plan", "n:"

# How much fold state a process keeps between appends, in nodes (a workflow counts as its
# nodes + 4): about 30 MB at most (measured: 5 plans of 10,000 named nodes with deps);
# beyond it the least recently written workflows go.
CACHE_NODES = 50_000
# Messages of other processes kept for a workflow while an append of ours holds its view.
FOLLOW_BUFFER = 64
# A fold of more nodes than this (state and plans together) runs in a worker thread.
THREAD_NODES = 2_000

HistoryItem = tuple[str | None, str, str | None, float]  # (definition, node, type, seconds)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


@dataclass(frozen=True)
class StoredProgress:
    """What a progress read finds in Redis."""

    state: progress.FoldState
    last_event_id: str | None
    shown: bytes | None


@dataclass(slots=True)
class View:
    """A workflow's fold state as of progress-hash version `ver` (last id `last`).

    `state` holds exactly the stored parts: meta, and the nodes in `nodes` (None: every
    node, and the plan; a node named there but absent from `state` is absent in Redis).
    """

    ver: int
    last: str
    state: progress.FoldState
    nodes: set[str] | None
    weight: int = 0  # its share of the cache budget, set when it is cached


def apply_published(view: View, message: bytes) -> bool:
    """Fold a published write (`=<ver before> <last before> <ver> <last> <parts>`) into
    `view`; False when it was written over a state other than the view's (one missed)."""
    head = message[1:].split(b" ", 4)
    if len(head) != 5:
        return False
    before, last_before, after, last, parts = head
    ver = int(after)
    if ver <= view.ver:
        return True  # already in the view (our own append, or one it lost to)
    if int(before) != view.ver or last_before.decode() != (view.last or "-"):
        return False
    flat = json.loads(parts)
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    meta = fields.pop(META, None)
    if meta is None:
        return False
    nodes = {f[len(NODE) :]: v for f, v in fields.items() if f.startswith(NODE)}
    state = progress.loads_parts(meta.encode(), None, nodes)
    view.state.nodes.update(state.nodes)
    state.nodes, state.plan = view.state.nodes, view.state.plan
    view.state = state
    if view.nodes is not None:
        view.nodes.update(nodes)
    view.ver, view.last = ver, last.decode()
    return True


def touched_by(events: Sequence[Event]) -> set[str] | None:
    """The nodes these events' fold reads or changes; None when it needs the whole state."""
    wanted: set[str] = set()
    for event in events:
        nodes = progress.touched_nodes(event)
        if nodes is None:
            return None
        wanted.update(nodes)
    return wanted


def read_fields(touched: set[str] | None) -> list[str] | None:
    """Progress-hash fields to read for these nodes; None: all of them."""
    if touched is None:
        return None
    return ["ver", "last", META, *(NODE + n for n in sorted(touched))]


def view_from(fields: dict[str, Any], touched: set[str] | None) -> View:
    """The view from progress-hash fields read for `touched` (all fields when None)."""
    meta = fields.get(META)
    ver = int(fields.get("ver") or 0)
    last = _text(fields["last"]) if fields.get("last") else ""
    if not meta:  # a new (or expired) workflow: nothing stored, so every part is known
        return View(ver, last, progress.new_state(), None)
    nodes = {f[len(NODE) :]: _bytes(v) for f, v in fields.items() if f.startswith(NODE) and v}
    plan = fields.get(PLAN)
    state = progress.loads_parts(_bytes(meta), _bytes(plan) if plan else None, nodes)
    return View(ver, last, state, None if touched is None else set(touched))


class SharedWorkflows:
    """The workflows another process appended to lately, as this process's appends found
    (a lost compare-and-set, or a merge): their appends send a Delta. A workflow only this
    process writes, the usual case, is spared the cost (3-5% of a one-event POST's CPU);
    the first append that finds another writer folds again, and the next ones merge."""

    SECONDS = 60.0  # a workflow counts as shared this long after the last such append
    LIMIT = 10_000  # workflows remembered at most; the least recently marked go first

    def __init__(self) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __contains__(self, workflow_id: str) -> bool:
        seen = self._seen.get(workflow_id)
        return seen is not None and time.monotonic() - seen < self.SECONDS

    def mark(self, workflow_id: str) -> None:
        self._seen[workflow_id] = time.monotonic()
        self._seen.move_to_end(workflow_id)
        if len(self._seen) > self.LIMIT:
            self._seen.popitem(last=False)


def merged_view(
    ver: int, last: str, meta: bytes, folded: progress.FoldState, touched: set[str]
) -> View:
    """The view after an append the script merged (lua/append.lua): the meta part it wrote,
    and of the nodes only those the fold touched (the others `folded` holds may be stale:
    another process's append came in between)."""
    state = progress.loads_parts(meta, None, {})
    state.nodes = {n: folded.nodes[n] for n in touched if n in folded.nodes}
    return View(ver, last, state, set(touched))


def grown(prior: View | None, view: View) -> View:
    """`prior` with the nodes of `view`, a fresh read, when it is still current (same `ver`
    and `last`): the parts this process knows of a workflow grow instead of being read
    again. Otherwise `view`."""
    if (
        prior is None
        or prior.nodes is None
        or view.nodes is None
        or (prior.ver, prior.last) != (view.ver, view.last)
    ):
        return view
    for node_id in view.nodes - prior.nodes:
        node = view.state.nodes.get(node_id)
        if node is not None:
            prior.state.nodes[node_id] = node
    prior.nodes |= view.nodes
    return prior


def fold_weight(state: progress.FoldState, events: Sequence[Event]) -> int:
    """Nodes a whole-state fold of `events` handles: the state's and the plans'."""
    planned = sum(len(e.nodes) for e in events if isinstance(e, WorkflowPlanned))
    return len(state.nodes) + planned


class Folded(NamedTuple):
    """What fold_parts() gives the append: the state, the events the script will store,
    their history items, the progress-hash fields to set and delete, and, for a fold of
    node events (not a plan, not a terminal state), its `Delta` as JSON, else b''."""

    state: progress.FoldState
    new_events: list[Event]
    history: list[tuple[int, HistoryItem]]
    updates: list[Any]
    deletes: list[str]
    delta: bytes


def fold_parts(
    state: progress.FoldState,
    events: Sequence[Event],
    known: dict[str, str],
    touched: set[str] | None,
    *,
    with_delta: bool = False,
) -> Folded:
    """Fold the events the script will store into `state` (in place); `with_delta`: note
    its Delta too (only a fold of node events and non-terminal states has one)."""
    # Only events the script will really store are folded; a key repeated in the batch
    # stores once.
    new_events: list[Event] = []
    history: list[tuple[int, HistoryItem]] = []
    seen = set(known)
    before_nodes = set(state.nodes) if touched is None else set()
    delta = Delta.before(state, touched) if with_delta and touched is not None else None
    for index, event in enumerate(events):
        key = event.idempotency_key
        if key and key in seen:
            continue
        if key:
            seen.add(key)
        new_events.append(event)
        for item in progress.history_items(state, event):  # before fold updates it
            history.append((index, item))
        node_id = getattr(event, "node_id", None)
        was_running = node_id in state.running
        state = progress.fold(state, event)
        if delta is not None:
            delta.step(state, event, node_id, was_running)

    updates: list[Any] = [META, progress.dumps_meta(state)]
    deletes: list[str] = []
    if touched is None:
        updates += [PLAN, progress.dumps_plan(state)]
        deletes = [NODE + n for n in before_nodes - state.nodes.keys()]
    for node_id in state.nodes if touched is None else touched & state.nodes.keys():
        updates += [NODE + node_id, progress.dumps_node(state.nodes[node_id])]
    wire = b"" if delta is None else delta.dumps(state, len(new_events))
    return Folded(state, new_events, history, updates, deletes, wire)


@dataclass(slots=True)
class Delta:
    """What a fold of node events (and non-terminal states) changed in the meta part, so
    that the append script can merge it onto a meta part that another process advanced
    meanwhile (lua/append.lua), instead of refusing it and making the fold run again.

    Such a fold depends on the meta part only through `plan_known` and `definition_id` (its
    failed attempts' history items name it), and on the parts of the nodes its events name:
    the script merges only when those are as the fold found them
    (`parts`: each node's part before the fold, None where absent). Then adding the
    counts, editing the running list and integrating the running count over the events'
    timestamps from the stored clock give exactly the serial fold's meta part.
    """

    plan_known: bool
    definition_id: str | None
    parts: list[Any]  # flat: field, the node's part before the fold (str) or None
    counts: list[int]  # before, per progress.STATUSES; after dumps(): the differences
    total: int
    failed: int
    running_before: int
    was_running: set[str]  # the touched nodes that ran before the fold
    started: dict[str, None]  # touched nodes (re)started by the fold, in start order
    first_start: int | None = None  # the earliest timestamp that may start the clock
    state: str | None = None  # the last workflow state the events set
    steps: list[int] | None = None  # per event: its timestamp, running count - before

    @classmethod
    def before(cls, state: progress.FoldState, touched: set[str]) -> Delta:
        flat: list[Any] = []
        for node_id in sorted(touched):
            node = state.nodes.get(node_id)
            flat += [NODE + node_id, None if node is None else progress.dumps_node(node).decode()]
        return cls(
            plan_known=state.plan_known,
            definition_id=state.definition_id,
            parts=flat,
            counts=[state.counts[s] for s in progress.STATUSES],
            total=state.total,
            failed=state.failed_attempts,
            running_before=len(state.running),
            was_running={n for n in touched if n in state.running},
            started={},
            steps=[],
        )

    def step(
        self, state: progress.FoldState, event: Event, node_id: str | None, was_running: bool
    ) -> None:
        """Note what folding `event` did (called after the fold)."""
        ts = state.updated_us
        assert ts is not None and self.steps is not None
        self.steps += (ts, len(state.running) - self.running_before)
        if progress.starts_clock(event) and (self.first_start is None or ts < self.first_start):
            self.first_start = ts
        if isinstance(event, WorkflowStateChanged):
            self.state = event.to_state
        if node_id is None:
            return
        if node_id not in state.running:
            self.started.pop(node_id, None)
        elif not was_running:  # started now: it goes to the end of the running list
            self.started.pop(node_id, None)
            self.started[node_id] = None

    def dumps(self, state: progress.FoldState, events: int) -> bytes:
        """The delta as the script takes it (ARGV `delta` of lua/append.lua)."""
        gone = [n for n in self.was_running if n not in state.running or n in self.started]
        return pydantic_core.to_json(
            {
                "pk": self.plan_known,
                "d": self.definition_id,
                "parts": self.parts,
                "c": [
                    state.counts[s] - c for s, c in zip(progress.STATUSES, self.counts, strict=True)
                ],
                "tot": state.total - self.total,
                "f": state.failed_attempts - self.failed,
                "q": events,
                "first": self.first_start,
                "last": state.updated_us,
                "s": self.state,
                "gone": sorted(gone),
                "new": list(self.started),
                "steps": self.steps,
            }
        )


def loads_stored(fields: dict[str, bytes]) -> tuple[bytes, bytes | None, dict[str, bytes]] | None:
    """The (meta, plan, nodes) parts of a whole progress hash; None when it holds none."""
    meta = fields.get(META)
    if not meta:
        return None
    nodes = {f[len(NODE) :]: v for f, v in fields.items() if f.startswith(NODE)}
    return meta, fields.get(PLAN), nodes


class ProgressCache:
    """The views this process's appends wrote last, by workflow id, CACHE_NODES at most.

    An append takes a workflow's view out (`take`: while in flight it owns and folds into
    it) and puts back the one it wrote (`keep`). Meanwhile what other processes publish
    for that workflow is buffered and applied at `keep`.
    """

    def __init__(self, cache_nodes: int = CACHE_NODES) -> None:
        self.cache_nodes = cache_nodes
        self.views: OrderedDict[str, View] = OrderedDict()
        self.weight = 0
        # What other processes wrote to workflows whose view an append of ours holds now.
        self._news: dict[str, list[bytes]] = {}

    def take(self, workflow_id: str, touched: set[str] | None) -> tuple[View | None, bool]:
        """The cached view of a workflow, and whether it holds every part these events need.

        It leaves the cache either way: an append in flight owns it (and folds into it), so
        a concurrent append of the same workflow in this process reads from Redis instead.
        """
        view = self.views.pop(workflow_id, None)
        if view is None:
            return None, False
        self.weight -= view.weight
        return view, view.nodes is None or (touched is not None and touched <= view.nodes)

    def follow(self, workflow_id: str, message: bytes, *, held: bool) -> None:
        """What another process's append wrote to a workflow's progress hash, as its script
        published it on the live channel (see lua/append.lua), in stored order: folded into
        the cached view, so that our next append's compare-and-set finds it current.
        `held`: an append of ours may hold the view now (buffered, applied at `keep`).

        Applied only onto the exact state it was written over (same `ver` and `last`): a
        missed message drops the view. Either way the script still compares `ver` and
        `last`, so a view that is not current costs a retry, never a wrong state."""
        view = self.views.get(workflow_id)
        if view is not None:
            try:
                applied = apply_published(view, message)
            except (ValueError, KeyError, TypeError, IndexError):
                # Not what this version publishes (another version of the server in a
                # rolling upgrade): forget the view rather than break the hub's reader.
                applied = False
            if not applied:
                self.drop(workflow_id)
            elif view.weight != 4 + len(view.state.nodes):
                self.drop(workflow_id)
                self.keep(workflow_id, view)
        elif held:  # an append holds the view: applied after it
            news = self._news.setdefault(workflow_id, [])
            if len(news) < FOLLOW_BUFFER:
                news.append(message)

    def released(self, workflow_id: str) -> None:
        """No append of ours holds the workflow any more: forget what was buffered."""
        self._news.pop(workflow_id, None)

    def drop(self, workflow_id: str) -> None:
        view = self.views.pop(workflow_id, None)
        if view is not None:
            self.weight -= view.weight

    def keep(self, workflow_id: str, view: View) -> None:
        """Cache the view written by an append; the least recently written go first."""
        news = self._news.pop(workflow_id, None)
        for message in news or ():  # what other processes wrote while our append ran
            try:
                if not apply_published(view, message):
                    return
            except (ValueError, KeyError, TypeError, IndexError):
                return  # not cached: see follow()
        view.weight = 4 + len(view.state.nodes)  # about a node's worth per part
        if view.weight > self.cache_nodes:
            return
        old = self.views.get(workflow_id)
        if old is not None:
            if old.ver >= view.ver:
                return  # a concurrent append of ours already left a newer one
            self.weight -= old.weight
        self.views[workflow_id] = view
        self.views.move_to_end(workflow_id)
        self.weight += view.weight
        while self.weight > self.cache_nodes:
            _, gone = self.views.popitem(last=False)
            self.weight -= gone.weight
