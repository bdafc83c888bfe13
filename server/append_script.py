"""The append script (lua/append.lua), loaded once, and the one function that builds its
arguments: `append_args(AppendArgs(...))`.

The script's KEYS and ARGV are documented once, at the top of lua/append.lua; AppendArgs
names each of them, and append_args() lays them out in that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import NamedTuple

from server import redis_keys
from server.models import Event, to_json_bytes

# Live messages carry several events each, up to this many bytes (see lua/append.lua).
PUBLISH_BYTES = 64 * 1024


def _load(name: str) -> str:
    """A script shipped in the package (server/lua/, package data in the wheel)."""
    return (resources.files("server") / "lua" / name).read_text(encoding="utf-8")


APPEND_LUA = _load("append.lua").replace("PUBLISH_BYTES", str(PUBLISH_BYTES))


class Encoded(NamedTuple):
    """Events as the script takes them (ARGV 14 and 15): per event the byte lengths of its
    idempotency key, event_type, terminal 0|1 and JSON, then all their bytes in a row."""

    lengths: bytes
    blob: bytes


def encode_events(events: Sequence[Event]) -> Encoded:
    """The events as the append script takes them: their lengths, and their bytes."""
    lens: list[str] = []
    parts: list[bytes] = []
    for event in events:
        key = (event.idempotency_key or "").encode()
        kind = event.event_type.encode()
        data = to_json_bytes(event)  # bytes: redis-py sends them as they are
        lens.append(f"{len(key)} {len(kind)} {1 if event.is_terminal else 0} {len(data)}")
        parts += (key, kind, data)
    return Encoded(" ".join(lens).encode(), b"".join(parts))


@dataclass(frozen=True, slots=True)
class AppendArgs:
    """One run of the append script; the fields in ARGV's order (see lua/append.lua)."""

    workflow_id: str  # its keys and channel
    maxlen: int
    ttl: int  # seconds
    publish_command: str  # PUBLISH, or SPUBLISH on Redis Cluster
    ver: int  # the progress-hash version the fold started from
    count: int  # events
    nset: int  # progress-hash fields to set, as pairs in `sets`
    ndel: int  # progress-hash fields to delete, in `deletes`
    last: str  # the progress hash's `last` the fold started from, '' not checked
    strict: bool  # an idempotency key already known is a conflict
    read: list[str] | None  # fields to answer on a conflict; None: the whole hash
    deadline_ms: int  # Redis time after which the script must not run; 0: none
    keep_keys: int  # idempotency keys to keep
    events: Encoded
    sets: bytes  # JSON: flat array of field, value strings
    deletes: bytes  # JSON: array of field names
    publish_parts: bool  # publish `sets` for other processes' caches (all that changed)


def append_args(a: AppendArgs) -> tuple[list[str], list[bytes | str | int]]:
    """The script's KEYS and ARGV."""
    argv: list[bytes | str | int] = [
        redis_keys.channel(a.workflow_id),
        a.maxlen,
        a.ttl,
        a.publish_command,
        a.ver,
        a.count,
        a.nset,
        a.ndel,
        a.last,
        "1" if a.strict else "0",
        -1 if a.read is None else len(a.read),
        a.deadline_ms,
        a.keep_keys,
        a.events.lengths,
        a.events.blob,
        a.sets,
        a.deletes,
        "1" if a.publish_parts else "0",
    ]
    if a.read is not None:
        argv += a.read
    return redis_keys.workflow_keys(a.workflow_id), argv
