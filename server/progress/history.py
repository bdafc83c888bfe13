"""Duration history per (definition, node) and per node_type, kept in Redis.

Two hashes per scope, written by one script: log-stats (count, mean, m2 of ln seconds),
which the ETA reads, and the recent record (runs, failed attempts, last seen, the last
KEEP_DURATIONS durations), which GET /definitions/{id}/stats reads for p50 and p90.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from server.redis_keys import (
    PREFIX,
    history_definition_key,
    history_recent_key,
    history_types_key,
)

if TYPE_CHECKING:
    pass

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
# Durations kept per node (and per node type) for the percentiles: the last this many
# completed runs, as integer microseconds (about 8 bytes each, so a field stays under half
# a KiB and a full hash of 10,000 nodes under 5 MB).
KEEP_DURATIONS = 50
# An item's seconds when it records a failed attempt instead of a duration: the item shape
# is progress.parts.HistoryItem's, (definition_id, node_id, node_type, seconds).
FAILED_ATTEMPT = -1.0
# Items per script call: a 10,000-node run's end would otherwise hold Redis for one long
# script; each item is its own update, so splitting changes nothing but the stall.
RECORD_CHUNK = 1_000

RedisClient = Redis | RedisCluster

# Two keys per script call, the log-stats hash and its recent record, which share a slot
# (redis_keys.history_recent_key puts the first's name in a hash tag), so the script runs on
# Redis Cluster.
# ARGV: ttl, max_count, max_fields, samples, keep, now (ms), then per item 4 values: field,
# log_duration ('' for a failed attempt), microseconds ('' for a failed attempt), node_type
# ('' if unknown). The fields are client strings, fine in a hash field and never in a key
# name. The field cap is checked in the script, so concurrent recorders cannot overshoot it.
# A recent record is "<runs> <failed> <last seen ms> <us,us,...|-> <node_type>".
_RECORD_LUA = """
local ttl = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local max_fields = tonumber(ARGV[3])
local samples = tonumber(ARGV[4])
local keep = tonumber(ARGV[5])
local now = ARGV[6]
local function make_room(key, size, pattern)
  while size >= max_fields do
    -- Full: the sampled field with the fewest runs makes room (unreadable ones first).
    local pick = redis.call('HRANDFIELD', key, samples, 'WITHVALUES')
    local victim, fewest = nil, nil
    for j = 1, #pick, 2 do
      local a, b = string.match(pick[j + 1], pattern)
      local runs = (tonumber(a) or 0) + (tonumber(b) or 0)
      if fewest == nil or runs < fewest then
        victim, fewest = pick[j], runs
      end
    end
    size = size - redis.call('HDEL', key, victim)
  end
  return size + 1
end
local size = redis.call('HLEN', KEYS[1])
local rsize = redis.call('HLEN', KEYS[2])
for i = 7, #ARGV, 4 do
  local fld = ARGV[i]
  local failed = ARGV[i + 1] == ''
  if not failed then
    local x = tonumber(ARGV[i + 1])
    local n, mean, m2 = 0, 0.0, 0.0
    local cur = redis.call('HGET', KEYS[1], fld)
    if cur then
      local a, b, c = string.match(cur, '^(%S+) (%S+) (%S+)$')
      if a then
        n, mean, m2 = tonumber(a), tonumber(b), tonumber(c)
      end
    else
      size = make_room(KEYS[1], size, '^(%d+) ')
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
  local runs, fails, ring, kind = 0, 0, '', ''
  local cur = redis.call('HGET', KEYS[2], fld)
  if cur then
    local a, b, _, d, t = string.match(cur, '^(%d+) (%d+) (%d+) (%S+) (.*)$')
    if a then
      runs, fails, kind = tonumber(a), tonumber(b), t
      if d ~= '-' then ring = d end
    end
  else
    rsize = make_room(KEYS[2], rsize, '^(%d+) (%d+) ')
  end
  if ARGV[i + 3] ~= '' then kind = ARGV[i + 3] end
  if failed then
    fails = fails + 1
  else
    runs = runs + 1
    local held = 0
    if ring ~= '' then held = select(2, string.gsub(ring, ',', ',')) + 1 end
    while held >= keep do
      local comma = string.find(ring, ',', 1, true)
      ring = comma and string.sub(ring, comma + 1) or ''
      held = held - 1
    end
    ring = ring == '' and ARGV[i + 2] or ring .. ',' .. ARGV[i + 2]
  end
  if ring == '' then ring = '-' end
  redis.call('HSET', KEYS[2], fld, string.format('%d %d %s %s %s', runs, fails, now, ring, kind))
end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
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
            if seconds < 0:
                continue  # a failed attempt: no duration for the ETA
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


async def _eval(redis: RedisClient, keys: list[str], args: list[str]) -> None:
    client: Any = redis
    await client.eval(_RECORD_LUA, len(keys), *keys, *args)


async def record(
    redis: RedisClient,
    items: Iterable[tuple[str | None, str, str | None, float]],
    *,
    ttl_seconds: int,
    prefix: str = PREFIX,
    now: float | None = None,
) -> None:
    """Fold (definition_id, node_id, node_type, seconds) items into the stored history;
    seconds FAILED_ATTEMPT (any negative) counts a failed attempt instead of a duration."""
    if ttl_seconds < 1:
        raise ValueError("ttl_seconds must be at least 1")
    per_def: dict[str, list[list[str]]] = {}
    per_type: list[list[str]] = []
    for definition_id, node_id, node_type, seconds in items:
        if seconds < 0:
            x, micros = "", ""
        else:
            x, micros = repr(log_seconds(seconds)), str(round(seconds * 1_000_000))
        if definition_id is not None:
            key = history_definition_key(definition_id, prefix=prefix)
            per_def.setdefault(key, []).append([node_id, x, micros, node_type or ""])
        if node_type is not None:
            per_type.append([node_type, x, micros, ""])
    seen_ms = round((time.time() if now is None else now) * 1000)
    head = [
        str(ttl_seconds),
        str(MAX_COUNT),
        str(MAX_HISTORY_FIELDS),
        str(EVICTION_SAMPLES),
        str(KEEP_DURATIONS),
        str(seen_ms),
    ]
    scopes = list(per_def.items())
    if per_type:
        scopes.append((history_types_key(prefix=prefix), per_type))
    # One atomic script per key and chunk: read-modify-write of Welford stats cannot be a
    # plain HINCRBYFLOAT, and concurrent runs finishing together must not lose an update.
    for key, rows in scopes:
        for start in range(0, len(rows), RECORD_CHUNK):
            args = [value for row in rows[start : start + RECORD_CHUNK] for value in row]
            await _eval(redis, [key, history_recent_key(key, prefix=prefix)], head + args)


async def load(
    redis: RedisClient,
    definition_id: str | None,
    node_ids: list[str],
    node_types: list[str],
    *,
    prefix: str = PREFIX,
) -> HistoryView:
    """Fetch the stats for these nodes and types: at most one HMGET per key."""
    client: Any = redis
    nodes: dict[str, Stats] = {}
    types: dict[str, Stats] = {}
    if definition_id is not None and node_ids:
        raw = await client.hmget(history_definition_key(definition_id, prefix=prefix), node_ids)
        for node_id, value in zip(node_ids, raw, strict=True):
            stats = _decode(value)
            if stats is not None:
                nodes[node_id] = stats
    if node_types:
        raw = await client.hmget(history_types_key(prefix=prefix), node_types)
        for node_type, value in zip(node_types, raw, strict=True):
            stats = _decode(value)
            if stats is not None:
                types[node_type] = stats
    return HistoryView(definition_id, nodes, types)
