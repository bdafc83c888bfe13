"""Event models: a discriminated union on `event_type`, strict, Unicode-safe."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

WORKFLOW_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
EVENT_ID_RE = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")  # ASCII digits only: Redis takes no other
MAX_NODES = 10_000
MAX_BATCH = 1_000
MAX_DURATION_MS = 10 * 365 * 86_400_000  # ten years: beyond that a duration is a bug

State = Literal["CREATED", "PENDING", "RUNNING", "PAUSED", "COMPLETED", "FAILED", "CANCELLED"]
TERMINAL_STATES: frozenset[str] = frozenset({"COMPLETED", "FAILED", "CANCELLED"})

NodeId = Annotated[str, Field(min_length=1, max_length=256)]
Name = Annotated[str, Field(max_length=1024)]
Text = Annotated[str, Field(max_length=65_536)]


def is_workflow_id(value: str) -> bool:
    """True when `value` is a valid workflow id (checked before it reaches Redis)."""
    return WORKFLOW_ID_RE.fullmatch(value) is not None


def parse_event_id(value: str) -> tuple[int, int] | None:
    """`<ms>-<seq>` as a comparable tuple, or None when malformed or out of range."""
    m = EVENT_ID_RE.fullmatch(value)
    if m is None:
        return None
    ms, seq = int(m.group(1)), int(m.group(2))
    if ms >= 2**64 or seq >= 2**64:
        return None
    return ms, seq


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def _rfc3339_only(value: Any) -> Any:
    """Accept an RFC 3339 string (or a datetime from Python), never a number or a date."""
    if isinstance(value, str) and _RFC3339.fullmatch(value):
        try:
            datetime.fromisoformat(value.replace("z", "Z")).astimezone(UTC)
        except (ValueError, OverflowError):
            raise ValueError("timestamp is not a representable UTC time") from None
    if isinstance(value, datetime) or value is None:
        return value
    if isinstance(value, str) and _RFC3339.fullmatch(value):
        return value
    raise ValueError("timestamp must be RFC 3339 with an offset, e.g. 2026-01-22T10:28:00Z")


def _in_utc(value: datetime) -> datetime:
    """Timestamps are kept in UTC, so pydantic's own JSON form of them ends in `Z` (no
    Python serializer called per event)."""
    offset = value.utcoffset()
    return value if offset is not None and not offset else value.astimezone(UTC)


def format_timestamp(value: datetime) -> str:
    """RFC 3339 in UTC with a `Z`, keeping sub-second precision when present."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


class _Event(BaseModel):
    # Strict: "0.5" is not a fraction and 1769077817 is not a timestamp.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    workflow_id: str | None = None
    timestamp: (
        Annotated[
            AwareDatetime,
            Field(strict=False),
            BeforeValidator(_rfc3339_only),
            AfterValidator(_in_utc),
        ]
        | None
    ) = None
    idempotency_key: Annotated[str, Field(min_length=1, max_length=128)] | None = None

    @field_validator("workflow_id")
    @classmethod
    def _check_workflow_id(cls, value: str | None) -> str | None:
        if value is not None and not is_workflow_id(value):
            raise ValueError("workflow_id must be 1-128 of A-Z a-z 0-9 . _ - starting alnum")
        return value

    @property
    def is_terminal(self) -> bool:
        return False


class PlannedNode(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    node_id: NodeId
    node_name: Name | None = None
    node_type: Name | None = None
    depends_on: list[NodeId] | None = None


class WorkflowPlanned(_Event):
    event_type: Literal["workflow_planned"]
    nodes: Annotated[list[PlannedNode], Field(min_length=1, max_length=MAX_NODES)]
    definition_id: Name | None = None
    max_concurrency: Annotated[StrictInt, Field(ge=1, le=MAX_NODES)] | None = None

    @model_validator(mode="after")
    def _check_dag(self) -> WorkflowPlanned:
        ids = [n.node_id for n in self.nodes]
        known = set(ids)
        if len(known) != len(ids):
            raise ValueError("node ids must be unique")
        deps: dict[str, list[str]] = {}
        for node in self.nodes:
            for dep in node.depends_on or ():
                if dep not in known:
                    raise ValueError(f"node {node.node_id!r} depends on unplanned node {dep!r}")
            deps[node.node_id] = list(node.depends_on or ())
        if _has_cycle(deps):
            raise ValueError("depends_on contains a cycle")
        return self


def _has_cycle(deps: dict[str, list[str]]) -> bool:
    """Kahn's algorithm: a cycle leaves nodes that never reach in-degree zero."""
    indegree = {node: len(set(parents)) for node, parents in deps.items()}
    children: dict[str, list[str]] = {node: [] for node in deps}
    for node, parents in deps.items():
        for parent in set(parents):
            children[parent].append(node)
    ready = [node for node, d in indegree.items() if d == 0]
    seen = 0
    while ready:
        node = ready.pop()
        seen += 1
        for child in children[node]:
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    return seen != len(deps)


class WorkflowStateChanged(_Event):
    event_type: Literal["workflow_state_changed"]
    to_state: State
    from_state: State | None = None
    reason: Text | None = None

    @property
    def is_terminal(self) -> bool:
        return self.to_state in TERMINAL_STATES


class NodeStarted(_Event):
    event_type: Literal["node_started"]
    node_id: NodeId
    node_name: Name | None = None
    node_type: Name | None = None


class NodeProgress(_Event):
    event_type: Literal["node_progress"]
    node_id: NodeId
    fraction: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
    message: Text | None = None


class NodeCompleted(_Event):
    event_type: Literal["node_completed"]
    node_id: NodeId
    node_name: Name | None = None
    node_type: Name | None = None
    duration_ms: Annotated[StrictInt, Field(ge=0, le=MAX_DURATION_MS)] | None = None
    output: dict[str, Any] | None = None


class NodeFailed(_Event):
    event_type: Literal["node_failed"]
    node_id: NodeId
    node_name: Name | None = None
    node_type: Name | None = None
    error: Text
    duration_ms: Annotated[StrictInt, Field(ge=0, le=MAX_DURATION_MS)] | None = None


class NodeSkipped(_Event):
    event_type: Literal["node_skipped"]
    node_id: NodeId
    reason: Text | None = None


Event = Annotated[
    WorkflowPlanned
    | WorkflowStateChanged
    | NodeStarted
    | NodeProgress
    | NodeCompleted
    | NodeFailed
    | NodeSkipped,
    Field(discriminator="event_type"),
]
event_adapter: TypeAdapter[Event] = TypeAdapter(Event)


class EventRejected(ValueError):
    """An event (or batch) failed validation; `errors` is a list of {loc, msg}."""

    def __init__(self, detail: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors


def json_size(obj: Any) -> int:
    """Bytes of `obj` as compact UTF-8 JSON: how an event's size is measured.

    Raises UnicodeEncodeError for a lone surrogate, which no UTF-8 output can carry.
    """
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str)
    return len(text.encode())


# A lone surrogate can only come from a `\uD800`-`\uDFFF` escape: the body itself is strict
# UTF-8. Bodies without one (almost all) skip the re-encoding that proves it.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def decode_body(body: bytes) -> Any:
    """Parse a request body as JSON text that UTF-8 output can carry.

    Raises ValueError (or UnicodeError) for malformed UTF-8 or JSON, NaN and Infinity, and
    lone surrogates (`\ud800` escapes, which are not Unicode text).
    """

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    value = json.loads(body.decode("utf-8"), parse_constant=no_constants)
    if _SURROGATE_ESCAPE.search(body):
        json.dumps(value, ensure_ascii=False).encode()
    return value


def to_json(event: _Event) -> str:
    """The stored, normalised form: one line of JSON, raw UTF-8, no null fields."""
    # model_dump_json() without its Python wrapper (the same serializer and defaults).
    return event.__pydantic_serializer__.to_json(event, exclude_none=True).decode()


def validate_event(
    raw: Any,
    workflow_id: str,
    *,
    max_event_bytes: int,
    now: datetime,
    size: int | None = None,
    loc_prefix: Sequence[int | str] = (),
    text_checked: bool = False,
) -> Event:
    """Validate one raw event for `workflow_id`; fill workflow_id and timestamp.

    `size` is the event's size as received, when known; `text_checked` says that every
    string in `raw` is known to be storable as UTF-8 (decode_body() proved it). With both,
    the event is not re-encoded to measure it.
    """
    prefix = list(loc_prefix)
    if isinstance(raw, BaseModel):
        raw = raw.model_dump(exclude_none=True)
    if not isinstance(raw, dict):
        raise EventRejected(
            "an event must be a JSON object", [{"loc": prefix, "msg": "not an object"}]
        )
    if size is None or not text_checked:
        try:
            measured = json_size(raw)  # also proves every string is storable as UTF-8
        except UnicodeEncodeError:
            raise EventRejected(
                "event holds a lone surrogate, which is not Unicode text",
                [{"loc": prefix, "msg": "lone surrogate in a string"}],
            ) from None
        if size is None:
            size = measured
    if raw.get("event_type") != "workflow_planned":
        nbytes = size
        if nbytes > max_event_bytes:
            raise EventRejected(
                f"event is {nbytes} bytes, over MAX_EVENT_BYTES ({max_event_bytes})",
                [{"loc": prefix, "msg": f"event larger than {max_event_bytes} bytes"}],
            )
    # Filled in before validation, so the model is built once (no model_copy afterwards).
    if raw.get("workflow_id") is None or raw.get("timestamp") is None:
        raw = dict(raw)
        if raw.get("workflow_id") is None:
            raw["workflow_id"] = workflow_id
        if raw.get("timestamp") is None:
            raw["timestamp"] = now
    try:
        event = event_adapter.validate_python(raw)
    except ValidationError as exc:
        raise EventRejected(
            "invalid event",
            [{"loc": prefix + list(e["loc"]), "msg": e["msg"]} for e in exc.errors()],
        ) from None
    if event.workflow_id != workflow_id:
        raise EventRejected(
            "workflow_id in the event does not match the URL",
            [{"loc": [*prefix, "workflow_id"], "msg": f"must be {workflow_id!r} or absent"}],
        )
    return event
