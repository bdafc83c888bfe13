"""Every JSON answer of the HTTP API, defined once.

Each answer is a `TypedDict`: the code that builds one keeps its plain dict literal, typed,
so mypy checks every key and it costs nothing at run time (no model is validated per poll,
per progress frame or per summary). The OpenAPI schemas are generated from these
definitions (`schema()`, pydantic's TypeAdapter), and the tests read the key sets from them.

    Progress         GET /workflows/{id}/progress, `event: progress`   progress.snapshot
      RunningNode    its `running` entries
    Gap              the data of `event: gap` (and the WebSocket's gap)  streams.events
    Accepted         201 of POST /workflows/{id}/events                 views (joined text)
    HistoryPage      GET /workflows/{id}/events as JSON                 views (joined text)
      StoredEvent    one of its events
    RunSummary       a summary of GET /workflows, `event: run`          overview.summaries
    RunList          GET /workflows                                     overview.views
    Schedule         GET /workflows/{id}/schedule                       progress.service
      ScheduledNode  one of its nodes                                   progress.snapshot
    DefinitionStats  GET /definitions/{id}/stats                        progress.history
      NodeStats, NodeTypeStats
    Problem          every error (RFC 9457)                             problems
      ProblemError   one of its `errors`                                models.EventRejected

The key order of a definition is the order the answers have on the wire (tests compare
bytes), except NodeStats and NodeTypeStats: their own keys come first on the wire, the
shared figures (_Figures) first in the definition.

Modules that build answers import this one only for type checking (`TYPE_CHECKING`): it
imports the limits it documents (page sizes, batch size) from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, NonNegativeInt, TypeAdapter, with_config
from pydantic.json_schema import WithJsonSchema
from typing_extensions import TypedDict  # pydantic takes no typing.TypedDict before 3.12

from server.models import MAX_BATCH, State
from server.overview.runs import CURSOR_SECONDS
from server.overview.runs import PAGE_MAX as RUNS_PAGE_MAX
from server.progress.history import KEEP_DURATIONS
from server.views import PAGE_MAX

WORKFLOW_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
EVENT_ID_PATTERN = r"^[0-9]+-[0-9]+$"


def _timestamp(value: str) -> str:
    datetime.fromisoformat(value)  # a ValueError is the validation error
    return value


# The answers hold timestamps as the RFC 3339 strings they are sent as (models.format_timestamp).
Timestamp = Annotated[
    str, AfterValidator(_timestamp), WithJsonSchema({"type": "string", "format": "date-time"})
]
EventId = Annotated[str, Field(pattern=EVENT_ID_PATTERN)]
_FORBID = ConfigDict(extra="forbid")


@with_config(_FORBID)
class RunningNode(TypedDict):
    """A node that runs now."""

    node_id: str
    node_name: str | None
    started_at: Timestamp | None


@with_config(_FORBID)
class Progress(TypedDict):
    """The progress object of the SPEC: every key always present, null where unknown."""

    workflow_id: str
    state: State | None
    total_nodes: NonNegativeInt
    total_known: bool
    completed_nodes: NonNegativeInt
    failed_nodes: NonNegativeInt
    skipped_nodes: NonNegativeInt
    running_nodes: NonNegativeInt
    percentage: Annotated[float, Field(ge=0, le=100)]
    time_percentage: Annotated[float | None, Field(ge=0, le=100)]
    current_node: str | None
    running: list[RunningNode]
    started_at: Timestamp | None
    updated_at: Timestamp | None
    elapsed_seconds: Annotated[float | None, Field(ge=0)]
    estimated_remaining_seconds: Annotated[float | None, Field(ge=0)]
    estimated_completion_at: Timestamp | None
    last_event_id: Annotated[str | None, Field(pattern=EVENT_ID_PATTERN)]


@with_config(_FORBID)
class Gap(TypedDict):
    """The data of an `event: gap` frame: history was trimmed past the client's position."""

    requested: EventId
    earliest_available: Annotated[str | None, Field(pattern=EVENT_ID_PATTERN)]
    progress: Progress | None


@with_config(ConfigDict(extra="allow"))
class StoredEvent(TypedDict):
    """A stored event as a history page lists it: the Event object with its `id` first."""

    # Open: the rest is one of the Event schemas, which forbid an `id` of their own.
    id: EventId
    event_type: str


@with_config(_FORBID)
class HistoryPage(TypedDict):
    """A page of the retained history, oldest first."""

    events: Annotated[list[StoredEvent], Field(max_length=PAGE_MAX)]
    next: Annotated[
        str | None,
        Field(
            pattern=EVENT_ID_PATTERN,
            description="Pass as `after` for the next page; null when this page reached the end.",
        ),
    ]
    earliest_available: Annotated[
        str, Field(pattern=EVENT_ID_PATTERN, description="The oldest retained event's id.")
    ]


class _Figures(TypedDict):
    """What the duration history knows of a node or a node type."""

    runs: Annotated[NonNegativeInt, Field(description="Completed runs recorded.")]
    p50_seconds: Annotated[
        float | None,
        Field(ge=0, description=f"Median of the last {KEEP_DURATIONS} recorded durations."),
    ]
    p90_seconds: Annotated[float | None, Field(ge=0, description="90th percentile of the same.")]
    failure_rate: Annotated[
        float,
        Field(ge=0, le=1, description="Failed attempts (node_failed) / (runs + failed attempts)."),
    ]
    last_seen: Annotated[Timestamp, Field(description="When the history last recorded it.")]


@with_config(_FORBID)
class NodeStats(_Figures):
    """One node of a definition."""

    node_id: str
    node_type: str | None


@with_config(_FORBID)
class NodeTypeStats(_Figures):
    """One node type, across every definition (as the ETA uses it)."""

    node_type: str


@with_config(_FORBID)
class RunSummary(TypedDict):
    """One run in GET /workflows and its overview stream: the figures /progress gives."""

    workflow_id: Annotated[str, Field(pattern=WORKFLOW_ID_PATTERN)]
    definition_id: str | None
    state: State | None
    total_nodes: NonNegativeInt
    completed_nodes: NonNegativeInt
    failed_nodes: NonNegativeInt
    percentage: Annotated[float, Field(ge=0, le=100)]
    estimated_remaining_seconds: Annotated[float | None, Field(ge=0)]
    started_at: Timestamp | None
    updated_at: Timestamp | None
    watchers: Annotated[
        NonNegativeInt,
        Field(
            description="Event, progress and WebSocket streams open on the run, all processes "
            "together (a few seconds behind)."
        ),
    ]


@with_config(_FORBID)
class RunList(TypedDict):
    """GET /workflows: the known runs, most recently updated first."""

    workflows: Annotated[list[RunSummary], Field(max_length=RUNS_PAGE_MAX)]
    next: Annotated[
        str | None,
        Field(
            description="Pass as `cursor` for the next page of the same walk (valid "
            f"{CURSOR_SECONDS} s); null at the end."
        ),
    ]


@with_config(_FORBID)
class DefinitionStats(TypedDict):
    """GET /definitions/{definition_id}/stats: per node and per node type, sorted by name."""

    definition_id: Annotated[str, Field(pattern=WORKFLOW_ID_PATTERN)]
    nodes: Annotated[list[NodeStats], Field(min_length=1)]
    node_types: list[NodeTypeStats]


NodeStatus = Literal["pending", "running", "completed", "failed", "skipped"]


@with_config(_FORBID)
class ScheduledNode(TypedDict):
    """One node's real times (from its events) and predicted ones (from the ETA's futures)."""

    node_id: str
    node_name: str | None
    node_type: str | None
    depends_on: list[str]
    status: NodeStatus
    attempts: NonNegativeInt
    started_at: Annotated[Timestamp | None, Field(description="The latest attempt's start.")]
    finished_at: Annotated[
        Timestamp | None, Field(description="Its end (completed, failed, skipped).")
    ]
    expected_start_at: Annotated[
        Timestamp | None,
        Field(
            description="Predicted start: pending and failed nodes (a retry), while the run goes."
        ),
    ]
    expected_end_at: Annotated[
        Timestamp | None,
        Field(description="Predicted end: pending, failed and running nodes, while the run goes."),
    ]


@with_config(_FORBID)
class Schedule(TypedDict):
    """GET /workflows/{id}/schedule: the plan's nodes in plan order, then unplanned ones."""

    workflow_id: str
    state: State | None
    last_event_id: Annotated[str | None, Field(pattern=EVENT_ID_PATTERN)]
    started_at: Timestamp | None
    elapsed_seconds: Annotated[float | None, Field(ge=0)]
    estimated_remaining_seconds: Annotated[
        float | None, Field(ge=0, description="As /progress answers at `as_of` (smoothed).")
    ]
    estimated_completion_at: Annotated[
        Timestamp | None,
        Field(description="The latest expected_end_at: the right edge of the schedule."),
    ]
    as_of: Annotated[Timestamp, Field(description="The server's clock when it answered.")]
    nodes: list[ScheduledNode]


@with_config(_FORBID)
class Accepted(TypedDict):
    """The answer to a publish: the stored ids, in input order."""

    ids: Annotated[list[EventId], Field(min_length=1, max_length=MAX_BATCH)]


class ProblemError(TypedDict):
    """Where a request is invalid (a JSON path, or a query parameter), and why."""

    loc: Annotated[
        Sequence[str | int],
        WithJsonSchema({"type": "array", "items": {"type": ["string", "integer"]}}),
    ]
    msg: str


class _ProblemFields(TypedDict):
    type: str
    title: str
    status: Annotated[int, Field(ge=400, le=599)]
    detail: str


# `total=False`, not NotRequired: under `from __future__ import annotations` a TypedDict
# cannot read NotRequired (its __required_keys__ would hold `errors`), pydantic can.
class Problem(_ProblemFields, total=False):
    """RFC 9457 problem details."""

    errors: list[ProblemError]  # validation errors only


# Every answer with a component schema of its own, in the order the document lists them.
ANSWERS: tuple[type[Any], ...] = (
    Progress,
    RunningNode,
    Gap,
    Accepted,
    HistoryPage,
    DefinitionStats,
    Schedule,
    RunList,
    Problem,
)


_ADAPTERS: dict[type[Any], TypeAdapter[Any]] = {}


def adapter(answer: type[Any]) -> TypeAdapter[Any]:
    """A validator of one answer: for tests and the OpenAPI document, not the answer path."""
    if answer not in _ADAPTERS:
        _ADAPTERS[answer] = TypeAdapter(answer)
    return _ADAPTERS[answer]


def schema(answer: type[Any], ref_template: str) -> dict[str, Any]:
    """The JSON schema of one answer, with the definitions it refers to under `$defs`."""
    return adapter(answer).json_schema(ref_template=ref_template, mode="serialization")


def keys(answer: type[Any]) -> set[str]:
    """The keys an answer always has."""
    return set(answer.__required_keys__)


__all__ = [
    "ANSWERS",
    "EVENT_ID_PATTERN",
    "WORKFLOW_ID_PATTERN",
    "Accepted",
    "DefinitionStats",
    "Gap",
    "HistoryPage",
    "NodeStats",
    "NodeStatus",
    "NodeTypeStats",
    "Problem",
    "ProblemError",
    "Progress",
    "RunList",
    "RunSummary",
    "RunningNode",
    "Schedule",
    "ScheduledNode",
    "StoredEvent",
    "Timestamp",
    "adapter",
    "keys",
    "schema",
]
