"""Duration history per (definition, node) and per node_type, kept in Redis as log-stats."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

# Older runs weigh less once this many are recorded, so a definition that got slower is
# followed; below the cap the update is exact Welford.
MAX_COUNT = 100
# A zero-length duration has no logarithm; durations are clamped to one millisecond.
MIN_SECONDS = 0.001
# Fields per hash: node types in the shared one, node ids per definition (as many as the
# largest plan has nodes). Publishers name types and nodes freely, so without a cap the
# hashes grow with every new name; at the cap a new name evicts the least-used of a few
# sampled fields (Redis's own approximated LFU, done in the script), so recurring names
# keep their history, one-off names wash out, and recording never fails or refuses.
MAX_HISTORY_FIELDS = 10_000
EVICTION_SAMPLES = 5

RedisClient = Redis | RedisCluster

# One key per script call, so the same script runs on Redis Cluster (no CROSSSLOT).
# ARGV: ttl, max_count, max_fields, samples, then (field, log_duration) pairs; the fields
# are client strings, which is fine in a hash field and never reaches a key name. The
# field cap is checked in the script, so concurrent recorders cannot overshoot it.
_RECORD_LUA = """
local ttl = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local max_fields = tonumber(ARGV[3])
local samples = tonumber(ARGV[4])
local size = redis.call('HLEN', KEYS[1])
for i = 5, #ARGV, 2 do
  local fld = ARGV[i]
  local x = tonumber(ARGV[i + 1])
  local n, mean, m2 = 0, 0.0, 0.0
  local cur = redis.call('HGET', KEYS[1], fld)
  if cur then
    local a, b, c = string.match(cur, '^(%S+) (%S+) (%S+)$')
    if a then
      n, mean, m2 = tonumber(a), tonumber(b), tonumber(c)
    end
  else
    while size >= max_fields do
      -- Full: the sampled field with the fewest runs makes room (unreadable ones first).
      local pick = redis.call('HRANDFIELD', KEYS[1], samples, 'WITHVALUES')
      local victim, fewest = nil, nil
      for j = 1, #pick, 2 do
        local runs = tonumber(string.match(pick[j + 1], '^(%d+) ')) or 0
        if fewest == nil or runs < fewest then
          victim, fewest = pick[j], runs
        end
      end
      size = size - redis.call('HDEL', KEYS[1], victim)
    end
    size = size + 1
  end
  if n >= cap then
    m2 = m2 * (cap - 1) / n
    n = cap - 1
  end
  n = n + 1
  local delta = x - mean
  mean = mean + delta / n
  m2 = m2 + delta * (x - mean)
  redis.call('HSET', KEYS[1], fld, string.format('%d %.17g %.17g', n, mean, m2))
end
redis.call('EXPIRE', KEYS[1], ttl)
return 1
"""


@dataclass(frozen=True)
class Stats:
    """Count, mean and sum of squared deviations of ln(duration in seconds)."""

    count: int
    mean_log: float
    m2_log: float

    @property
    def var_log(self) -> float | None:
        """Sample variance of the log-durations, None with fewer than two."""
        return self.m2_log / (self.count - 1) if self.count >= 2 else None


def add(stats: Stats | None, log_duration: float, *, max_count: int = MAX_COUNT) -> Stats:
    """One Welford step (capped at `max_count`): the same arithmetic as the Lua script."""
    n, mean, m2 = (0, 0.0, 0.0) if stats is None else (stats.count, stats.mean_log, stats.m2_log)
    if n >= max_count:
        m2 = m2 * (max_count - 1) / n
        n = max_count - 1
    n += 1
    delta = log_duration - mean
    mean += delta / n
    m2 += delta * (log_duration - mean)
    return Stats(n, mean, m2)


def log_seconds(seconds: float) -> float:
    """ln of a duration, clamped so that zero durations stay finite."""
    return math.log(max(seconds, MIN_SECONDS))


def _decode(raw: bytes | str | None) -> Stats | None:
    """Parse "count mean m2"; anything unreadable counts as no history."""
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    parts = text.split()
    if len(parts) != 3:
        return None
    try:
        count, mean, m2 = int(parts[0]), float(parts[1]), float(parts[2])
    except ValueError:
        return None
    if count < 1 or not (math.isfinite(mean) and math.isfinite(m2)):
        return None
    return Stats(count, mean, max(m2, 0.0))


@dataclass(frozen=True)
class HistoryView:
    """Read-only history for one run: its definition's nodes and its node types."""

    definition_id: str | None = None
    nodes: dict[str, Stats] = field(default_factory=dict)
    types: dict[str, Stats] = field(default_factory=dict)

    def for_node(self, definition_id: str | None, node_id: str) -> Stats | None:
        """Stats of this node in previous runs of the same definition."""
        if definition_id is None or definition_id != self.definition_id:
            return None
        return self.nodes.get(node_id)

    def for_type(self, node_type: str | None) -> Stats | None:
        """Stats of every recorded node of this type, across definitions."""
        return None if node_type is None else self.types.get(node_type)

    @property
    def empty(self) -> bool:
        """True when nothing at all was found."""
        return not self.nodes and not self.types


EMPTY = HistoryView()


@dataclass
class MemoryHistory:
    """In-memory history with record()'s arithmetic, for benchmarks and tests."""

    nodes: dict[tuple[str, str], Stats] = field(default_factory=dict)
    types: dict[str, Stats] = field(default_factory=dict)

    def record(self, items: Iterable[tuple[str | None, str, str | None, float]]) -> None:
        """Add each (definition_id, node_id, node_type, seconds) like record() does."""
        for definition_id, node_id, node_type, seconds in items:
            x = log_seconds(seconds)
            if definition_id is not None:
                key = (definition_id, node_id)
                self.nodes[key] = add(self.nodes.get(key), x)
            if node_type is not None:
                self.types[node_type] = add(self.types.get(node_type), x)

    def view(
        self, definition_id: str | None, node_ids: Iterable[str], node_types: Iterable[str]
    ) -> HistoryView:
        """What load() would return for these keys."""
        nodes: dict[str, Stats] = {}
        if definition_id is not None:
            for node_id in node_ids:
                found = self.nodes.get((definition_id, node_id))
                if found is not None:
                    nodes[node_id] = found
        types = {t: self.types[t] for t in node_types if t in self.types}
        return HistoryView(definition_id, nodes, types)


def definition_key(definition_id: str, *, prefix: str = "wfsse") -> str:
    """Key of a definition's per-node hash; the client string is hashed, never embedded."""
    digest = hashlib.sha256(definition_id.encode()).hexdigest()
    return f"{prefix}:hist:def:{digest}"


def types_key(*, prefix: str = "wfsse") -> str:
    """Key of the per-node_type hash shared by all definitions."""
    return f"{prefix}:hist:types"


async def _eval(redis: RedisClient, key: str, args: list[str]) -> None:
    client: Any = redis
    await client.eval(_RECORD_LUA, 1, key, *args)


async def record(
    redis: RedisClient,
    items: list[tuple[str | None, str, str | None, float]],
    *,
    ttl_seconds: int,
    prefix: str = "wfsse",
) -> None:
    """Fold (definition_id, node_id, node_type, seconds) items into the stored stats."""
    if ttl_seconds < 1:
        raise ValueError("ttl_seconds must be at least 1")
    per_def: dict[str, list[str]] = {}
    per_type: list[str] = []
    for definition_id, node_id, node_type, seconds in items:
        x = repr(log_seconds(seconds))
        if definition_id is not None:
            per_def.setdefault(definition_key(definition_id, prefix=prefix), []).extend(
                (node_id, x)
            )
        if node_type is not None:
            per_type.extend((node_type, x))
    head = [str(ttl_seconds), str(MAX_COUNT), str(MAX_HISTORY_FIELDS), str(EVICTION_SAMPLES)]
    # One atomic script per key: read-modify-write of Welford stats cannot be a plain
    # HINCRBYFLOAT, and concurrent runs finishing together must not lose an update.
    for key, args in per_def.items():
        await _eval(redis, key, head + args)
    if per_type:
        await _eval(redis, types_key(prefix=prefix), head + per_type)


async def load(
    redis: RedisClient,
    definition_id: str | None,
    node_ids: list[str],
    node_types: list[str],
    *,
    prefix: str = "wfsse",
) -> HistoryView:
    """Fetch the stats for these nodes and types: at most one HMGET per key."""
    client: Any = redis
    nodes: dict[str, Stats] = {}
    types: dict[str, Stats] = {}
    if definition_id is not None and node_ids:
        raw = await client.hmget(definition_key(definition_id, prefix=prefix), node_ids)
        for node_id, value in zip(node_ids, raw, strict=True):
            stats = _decode(value)
            if stats is not None:
                nodes[node_id] = stats
    if node_types:
        raw = await client.hmget(types_key(prefix=prefix), node_types)
        for node_type, value in zip(node_types, raw, strict=True):
            stats = _decode(value)
            if stats is not None:
                types[node_type] = stats
    return HistoryView(definition_id, nodes, types)
