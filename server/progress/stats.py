"""What GET /definitions/{id}/stats answers: per node and per node type, the runs, p50 and
p90 of the last KEEP_DURATIONS durations, the failure rate and when it last ran, read
from the recent records that history.record() writes beside the ETA's log-stats.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from server.redis_keys import (
    PREFIX,
    history_definition_key,
    history_recent_key,
    history_types_key,
)

if TYPE_CHECKING:
    from server import wire

from server.progress.history import RedisClient


@dataclass(frozen=True)
class Recent:
    """A recent record: completed runs and failed attempts counted, the last durations."""

    runs: int
    failures: int
    last_seen_ms: int
    durations: tuple[float, ...]  # seconds, oldest first, at most KEEP_DURATIONS
    node_type: str | None


def decode_recent(raw: bytes | str | None) -> Recent | None:
    """Parse a recent record; anything unreadable counts as no history."""
    if raw is None:
        return None
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    parts = text.split(" ", 4)
    if len(parts) != 5 or not all(p.isascii() and p.isdigit() for p in parts[:3]):
        return None
    try:
        durations = () if parts[3] == "-" else tuple(int(d) / 1e6 for d in parts[3].split(","))
    except ValueError:
        return None
    runs, failures = int(parts[0]), int(parts[1])
    if runs + failures < 1:
        return None
    return Recent(runs, failures, int(parts[2]), durations, parts[4] or None)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation between order statistics, as numpy's
    default and statistics.quantiles(method="inclusive") compute it; None with no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def load_recent(
    redis: RedisClient, definition_id: str, *, prefix: str = PREFIX
) -> tuple[dict[str, Recent], dict[str, Recent]]:
    """A definition's recent records per node, and those of its node types (across every
    definition, as the ETA uses them): two round trips."""
    client: Any = redis
    raw = await client.hgetall(
        history_recent_key(history_definition_key(definition_id, prefix=prefix), prefix=prefix)
    )
    nodes: dict[str, Recent] = {}
    for name, value in raw.items():
        found = decode_recent(value)
        if found is not None:
            nodes[name.decode(errors="replace") if isinstance(name, bytes) else name] = found
    kinds = sorted({r.node_type for r in nodes.values() if r.node_type is not None})
    types: dict[str, Recent] = {}
    if kinds:
        values = await client.hmget(
            history_recent_key(history_types_key(prefix=prefix), prefix=prefix), kinds
        )
        for kind, value in zip(kinds, values, strict=True):
            found = decode_recent(value)
            if found is not None:
                types[kind] = found
    return nodes, types


def figures(recent: Recent) -> wire._Figures:
    """runs, p50_seconds, p90_seconds, failure_rate and last_seen of a record (the SPEC's
    figures; the failed attempts are in the rate)."""
    p50, p90 = percentile(recent.durations, 0.5), percentile(recent.durations, 0.9)
    seen = datetime.fromtimestamp(recent.last_seen_ms / 1000, UTC)
    return {
        "runs": recent.runs,
        "p50_seconds": None if p50 is None else round(p50, 3),
        "p90_seconds": None if p90 is None else round(p90, 3),
        "failure_rate": round(recent.failures / (recent.runs + recent.failures), 4),
        "last_seen": seen.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }


def definition_stats(
    definition_id: str, nodes: dict[str, Recent], types: dict[str, Recent]
) -> wire.DefinitionStats:
    """The body of GET /definitions/{id}/stats: per node and per node type, sorted by name."""
    return {
        "definition_id": definition_id,
        "nodes": [
            {"node_id": node_id, "node_type": nodes[node_id].node_type, **figures(nodes[node_id])}
            for node_id in sorted(nodes)
        ],
        "node_types": [{"node_type": kind, **figures(types[kind])} for kind in sorted(types)],
    }
