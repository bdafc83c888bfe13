"""Event models: a discriminated union on `event_type`, strict, Unicode-safe.

Also how a request body becomes events (`decode_body`, `validate_event`): a big body is
decoded and validated in pieces, so that no single C call holds the GIL for long, and
those pieces must give exactly the errors the models give (~600 lines for that reason).
"""

from __future__ import annotations

import json
import json.decoder
import math
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

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
from pydantic_core import ErrorDetails

if TYPE_CHECKING:
    from server import wire

WORKFLOW_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
EVENT_ID_RE = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")  # ASCII digits only: Redis takes no other
MAX_NODES = 10_000
MAX_BATCH = 1_000
MAX_DURATION_MS = 10 * 365 * 86_400_000  # ten years: beyond that a duration is a bug
# Arrays and objects an event may nest, counting the event object itself (a batch array is
# one more level). Real outputs stay far below; the C parser recurses once per level and
# pydantic's serializer gives up at about 255, so a deeper event could not be stored.
MAX_JSON_DEPTH = 64

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
_node_adapter: TypeAdapter[PlannedNode] = TypeAdapter(PlannedNode)
_nodes_adapter: TypeAdapter[list[PlannedNode]] = TypeAdapter(list[PlannedNode])

# A plan of more nodes than this is validated this many nodes at a time (about 3 ms each),
# so that a worker thread validating the SPEC's largest plan lets the event loop run.
PIECE_NODES = 1_000
_PLACEHOLDER = PlannedNode(node_id="-")


def _validate_at_once(raw: dict[str, Any]) -> Event | list[ErrorDetails]:
    try:
        return event_adapter.validate_python(raw)
    except ValidationError as exc:
        return exc.errors()


def _validate(raw: dict[str, Any]) -> Event | list[ErrorDetails]:
    """event_adapter.validate_python(raw): the event, or its errors in pydantic's order.

    A big plan's nodes are validated PIECE_NODES at a time first, and the event then from
    the nodes so built (pydantic takes a model instance as it is). With an invalid node,
    the event is validated with only the first invalid node as given (the others stand
    in valid, so the DAG check does not run, as it would not), and that node's errors are
    replaced with every invalid node's: the same list as in one call.
    """
    nodes = raw.get("nodes")
    if not (
        raw.get("event_type") == "workflow_planned"
        and isinstance(nodes, list)
        and PIECE_NODES < len(nodes) <= MAX_NODES
    ):
        return _validate_at_once(raw)
    built: list[Any] = []
    invalid: list[tuple[int, list[ErrorDetails]]] = []
    for start in range(0, len(nodes), PIECE_NODES):
        piece = nodes[start : start + PIECE_NODES]
        try:
            built += _nodes_adapter.validate_python(piece)
        except ValidationError:
            for index, node in enumerate(piece, start):
                try:
                    built.append(_node_adapter.validate_python(node))
                except ValidationError as exc:
                    built.append(node if not invalid else _PLACEHOLDER)
                    invalid.append((index, exc.errors()))
    try:
        return event_adapter.validate_python({**raw, "nodes": built})
    except ValidationError as exc:
        errors = exc.errors()
    if not invalid:
        return errors
    first = ("workflow_planned", "nodes", invalid[0][0])
    at = next((i for i, e in enumerate(errors) if tuple(e["loc"][:3]) == first), None)
    if at is None:  # not expected: then the errors as one call gives them
        return _validate_at_once(raw)
    end = next(
        (i for i, e in enumerate(errors[at:], at) if tuple(e["loc"][:3]) != first), len(errors)
    )
    located: list[ErrorDetails] = [
        {**e, "loc": ("workflow_planned", "nodes", index, *e["loc"])}
        for index, node_errors in invalid
        for e in node_errors
    ]
    return errors[:at] + located + errors[end:]


class EventRejected(ValueError):
    """An event (or batch) failed validation; `errors` is a list of {loc, msg}."""

    def __init__(self, detail: str, errors: list[wire.ProblemError]) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors


NOT_FINITE = "number is not finite (JSON has no Infinity)"


def too_deep(loc: Sequence[int | str] = ()) -> EventRejected:
    """The error for JSON nested past MAX_JSON_DEPTH, on every input path alike."""
    return EventRejected(
        f"invalid event: arrays and objects nested deeper than {MAX_JSON_DEPTH} levels"
        " (MAX_JSON_DEPTH); nothing was stored",
        [{"loc": list(loc), "msg": f"nested deeper than {MAX_JSON_DEPTH} levels"}],
    )


def not_finite(loc: Sequence[int | str]) -> EventRejected:
    """The error for a number out of float range (or NaN), with where it is."""
    where = ".".join(str(p) for p in loc) or "event"
    return EventRejected(
        f"invalid event: {where}: {NOT_FINITE}; nothing was stored",
        [{"loc": list(loc), "msg": NOT_FINITE}],
    )


# Only the bytes that can open, close or quote survive; `{}` read as `[]` (nesting counts
# both alike, and a mismatch is malformed JSON, which the parser reports).
_MARKS = bytes.maketrans(b"{}", b"[]")
_NOT_MARKS = bytes(b for b in range(256) if b not in b'"[]{}')


def check_nesting(text: bytes, limit: int = MAX_JSON_DEPTH) -> None:
    """Reject JSON `text` that nests arrays and objects deeper than `limit`, before parsing.

    Linear, and in C: the parser and the serializer recurse per level, this does not.
    Raises EventRejected when too deep, ValueError when the brackets outside strings do not
    balance (malformed JSON however deep). Strings are skipped, escapes included.
    """
    if len(text) <= 2 * limit:
        return  # too short to hold limit + 1 pairs of brackets
    if b"\\" in text:
        # Left to right, `\\` is one escaped backslash; then no `\"` ends a string.
        text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = text.translate(_MARKS, _NOT_MARKS)
    if marks.count(b"[") <= limit:
        return
    if b'"' in marks:
        # `""` is a string without brackets, or the end of one string and the start of the
        # next with no bracket between: dropping either keeps every bracket on its side.
        marks = marks.replace(b'""', b"")
        if b'"' in marks:
            marks = b"".join(marks.split(b'"')[::2])  # what is left between strings
    # Each pass drops the innermost pairs, one level everywhere; `limit` passes empty any
    # balanced text nested at most `limit` deep.
    for _ in range(limit):
        inner = marks.replace(b"[]", b"")
        if len(inner) == len(marks):
            break
        marks = inner
    if b"[]" in marks:
        raise too_deep()
    if marks:
        raise ValueError("unbalanced brackets")


def _first_unstorable(value: Any, loc: list[int | str], levels_left: int) -> EventRejected | None:
    """The first number that is not finite, depth-first; or too_deep() past the limit."""
    if isinstance(value, float):
        return None if math.isfinite(value) else not_finite(loc)
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    if levels_left == 0:
        return too_deep()
    for key, item in items:
        found = _first_unstorable(item, [*loc, key], levels_left - 1)
        if found is not None:
            return found
    return None


def find_unstorable(value: Any, loc: Sequence[int | str] = ()) -> None:
    """Raise EventRejected for a number that is not finite, at its loc, or for nesting
    past MAX_JSON_DEPTH (loc: `loc` itself), counting `value` as the first level."""
    found = _first_unstorable(value, list(loc), MAX_JSON_DEPTH)
    if found is not None:
        if found.errors[0]["msg"] != NOT_FINITE:
            raise too_deep(loc)
        raise found


def json_size(obj: Any, loc: Sequence[int | str] = ()) -> int:
    """Bytes of `obj` as compact UTF-8 JSON: how an event's size is measured.

    Raises EventRejected for numbers that are not finite and nesting past MAX_JSON_DEPTH
    (a cycle counts as endless nesting), UnicodeEncodeError for a lone surrogate, which no
    UTF-8 output can carry.
    """
    try:
        text = json.dumps(
            obj, ensure_ascii=False, separators=(",", ":"), default=str, allow_nan=False
        )
    except RecursionError:
        raise too_deep(loc) from None
    except ValueError:  # inf or nan, or a circular reference: say which, and where
        find_unstorable(obj, loc)
        raise too_deep(loc) from None
    data = text.encode()
    try:
        check_nesting(data)
    except EventRejected:
        raise too_deep(loc) from None
    return len(data)


# A lone surrogate can only come from a `\uD800`-`\uDFFF` escape: the body itself is strict
# UTF-8. Bodies without one (almost all) skip the re-encoding that proves it.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class _NotFinite(Exception):
    """Raised from the parser at a number beyond float range; located afterwards."""


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    # Called only for literals with a fraction or exponent; 1e999 would parse as inf.
    value = float(text)
    if value - value != 0.0:  # inf - inf is nan, and nan equals nothing
        raise _NotFinite
    return value


# Built once: json.loads() with keyword arguments builds a decoder per call.
_DECODER = json.JSONDecoder(parse_constant=_no_constants, parse_float=_finite_float)
_LOOSE_DECODER = json.JSONDecoder(parse_constant=_no_constants)

# Text longer than this is parsed in pieces (see _decode_in_pieces): one C call over 4 MiB
# holds the GIL for 20 ms or more, so even a worker thread would stall the event loop.
PIECES_BYTES = 256 * 1024
_Scan = Callable[[str, int], tuple[Any, int]]


# The C scanner of _DECODER, and the pure-Python object and array parsers json.decoder
# falls back to without it (neither is in typeshed's stubs).
_SCAN_C: _Scan = _DECODER.scan_once  # type: ignore[attr-defined]
_OBJECT: Callable[..., tuple[Any, int]] = json.decoder.JSONObject  # type: ignore[attr-defined]
_ARRAY: Callable[..., tuple[Any, int]] = json.decoder.JSONArray  # type: ignore[attr-defined]
_WHITESPACE: Callable[[str, int], re.Match[str]] = json.decoder.WHITESPACE.match  # type: ignore[attr-defined]


def _piece_scanner(levels: int) -> _Scan:
    """A scanner that parses the arrays and objects of the outer `levels` levels in Python,
    and each value below them with the C scanner in one call."""
    inner = _SCAN_C if levels == 1 else _piece_scanner(levels - 1)
    memo: dict[str, str] = {}

    def scan_once(text: str, idx: int) -> tuple[Any, int]:
        mark = text[idx : idx + 1]
        if mark == "{":
            return _OBJECT((text, idx + 1), True, inner, None, None, memo)
        if mark == "[":
            return _ARRAY((text, idx + 1), inner)
        return _SCAN_C(text, idx)

    return scan_once


def _decode_in_pieces(text: str, levels: int) -> Any:
    """What _DECODER.decode(text) returns, but the outer `levels` levels are parsed in
    Python, so no C call parses more than one value below them (a plan's node, a batch's
    event field): a worker thread running this gives the GIL back every switch interval.

    For text the C decoder rejects it raises a ValueError (or _NotFinite) of its own:
    _decode() then decodes it again in C, for the usual message.
    """
    scan_once = _piece_scanner(levels)
    try:
        value, end = scan_once(text, _WHITESPACE(text, 0).end())
    except StopIteration as exc:
        raise json.JSONDecodeError("Expecting value", text, exc.value) from None
    if _WHITESPACE(text, end).end() != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def _decode(text: str, levels: int) -> Any:
    """_DECODER.decode(text), in pieces below `levels` levels (0: in one C call)."""
    if levels:
        try:
            return _decode_in_pieces(text, levels)
        except (ValueError, _NotFinite):
            pass  # decoded again in C: the same error, message and position as ever
    return _DECODER.decode(text)


def decode_body(body: bytes) -> Any:
    """Parse a request body as JSON text that UTF-8 output can carry.

    Raises EventRejected (422) for nesting past MAX_JSON_DEPTH (one more for a batch array)
    and for numbers beyond float range, with their loc from the body's root; ValueError (or
    UnicodeError) for malformed UTF-8 or JSON, NaN and Infinity, and lone surrogates
    (`\ud800` escapes, which are not Unicode text).
    """
    batch = body.lstrip(b" \t\r\n")[:1] == b"["
    check_nesting(body, MAX_JSON_DEPTH + 1 if batch else MAX_JSON_DEPTH)
    text = body.decode("utf-8")
    # Past PIECES_BYTES the batch array, its events and the arrays and objects in their
    # fields (a plan's node list) are parsed in Python, each value below in C.
    levels = (3 if batch else 2) if len(body) > PIECES_BYTES else 0
    try:
        value = _decode(text, levels)
    except _NotFinite:
        # Rare, so parsed again to say where: the loc a validation error would give.
        value = _LOOSE_DECODER.decode(text)
        if isinstance(value, list):
            for i, item in enumerate(value):
                find_unstorable(item, [i])
        find_unstorable(value)
        raise ValueError("a number is out of range") from None  # not reached
    if _SURROGATE_ESCAPE.search(body):
        json.dumps(value, ensure_ascii=False).encode()
    return value


def to_json(event: _Event) -> str:
    """The stored, normalised form: one line of JSON, raw UTF-8, no null fields."""
    return to_json_bytes(event).decode()


def to_json_bytes(event: _Event) -> bytes:
    """to_json() as UTF-8 bytes; a big plan's nodes PIECE_NODES at a time."""
    # model_dump_json() without its Python wrapper (the same serializer and defaults).
    serializer = event.__pydantic_serializer__
    if not (isinstance(event, WorkflowPlanned) and len(event.nodes) > PIECE_NODES):
        return serializer.to_json(event, exclude_none=True)
    # One call for a 4 MiB plan holds the GIL for 10 ms. A JSON string cannot hold this
    # (its quotes are escaped): the first one is the field's.
    head, tail = serializer.to_json(
        event.model_copy(update={"nodes": []}), exclude_none=True
    ).split(b'"nodes":[]', 1)
    nodes = event.nodes
    pieces = [
        _nodes_adapter.dump_json(nodes[start : start + PIECE_NODES], exclude_none=True)[1:-1]
        for start in range(0, len(nodes), PIECE_NODES)
    ]
    return b"".join((head, b'"nodes":[', b",".join(pieces), b"]", tail))


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
            # Also proves every string storable as UTF-8, every number finite and the
            # nesting within MAX_JSON_DEPTH: the checks decode_body() made on the bytes.
            measured = json_size(raw, prefix)
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
    event = _validate(raw)
    if isinstance(event, list):
        raise EventRejected(
            "invalid event", [{"loc": prefix + list(e["loc"]), "msg": e["msg"]} for e in event]
        )
    if event.workflow_id != workflow_id:
        raise EventRejected(
            "workflow_id in the event does not match the URL",
            [{"loc": [*prefix, "workflow_id"], "msg": f"must be {workflow_id!r} or absent"}],
        )
    return event
