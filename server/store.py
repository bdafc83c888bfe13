"""Redis layout of a workflow, the atomic append script, and reads after an id."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from . import progress
from .models import Event, parse_event_id, to_json

logger = logging.getLogger(__name__)

AnyRedis = Redis | RedisCluster

# Every key of a workflow shares the hash tag `{<workflow_id>}`, so one Lua script can touch
# them all and, on Redis Cluster, they live on one shard with the workflow's channel.


def stream_key(workflow_id: str) -> str:
    """The stream: the source of truth for replay."""
    return f"wf:{{{workflow_id}}}:events"


def trimmed_key(workflow_id: str) -> str:
    """The newest id that MAXLEN trimmed away (Redis 7.0 does not track it for us)."""
    return f"wf:{{{workflow_id}}}:trimmed"


def idempotency_key(workflow_id: str) -> str:
    """Hash: idempotency_key -> the id it was first stored under."""
    return f"wf:{{{workflow_id}}}:idem"


def progress_key(workflow_id: str) -> str:
    """Hash: `ver` (appends so far), `last` (last id), `fold` (progress state), `shown`."""
    return f"wf:{{{workflow_id}}}:progress"


def channel(workflow_id: str) -> str:
    """Pub/sub channel that carries `<id> <event_type> <terminal 0|1> <json>`."""
    return f"wf:{{{workflow_id}}}:live"


def workflow_keys(workflow_id: str) -> list[str]:
    """All keys of one workflow (for tests and cleanup)."""
    return [
        stream_key(workflow_id),
        trimmed_key(workflow_id),
        idempotency_key(workflow_id),
        progress_key(workflow_id),
    ]


# KEYS: stream, trimmed, idem, progress.
# ARGV: channel, maxlen, ttl, publish command, expected ver, event count E, state fields to
#       set S, state fields to delete D; then 4 per event (idempotency key or '', event_type,
#       terminal 0|1, json); then S field/value pairs; then D field names.
# Returns {ids, added}: `ids` in input order (a known idempotency key returns its first id);
# added = -1 when `ver` moved since the caller read it (another writer won: retry).
APPEND_LUA = """
local ver = tonumber(redis.call('HGET', KEYS[4], 'ver') or '0')
if ver ~= tonumber(ARGV[5]) then
  return {{}, -1}
end
local n, nset, ndel = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local ids = {}
local added = 0
local last = false
for i = 0, n - 1 do
  local b = 9 + i * 4
  local ik = ARGV[b]
  local known = false
  if ik ~= '' then known = redis.call('HGET', KEYS[3], ik) end
  if known then
    ids[#ids + 1] = known
  else
    local t, x, d = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3]
    local id = redis.call('XADD', KEYS[1], '*', 't', t, 'x', x, 'd', d)
    if ik ~= '' then redis.call('HSET', KEYS[3], ik, id) end
    redis.call(ARGV[4], ARGV[1], id .. ' ' .. t .. ' ' .. x .. ' ' .. d)
    ids[#ids + 1] = id
    added = added + 1
    last = id
  end
end
if added > 0 then
  local maxlen = tonumber(ARGV[2])
  local len = redis.call('XLEN', KEYS[1])
  if len > maxlen then
    local gone = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', len - maxlen)
    redis.call('SET', KEYS[2], gone[#gone][1])
    redis.call('XTRIM', KEYS[1], 'MAXLEN', maxlen)
  end
  redis.call('HSET', KEYS[4], 'ver', ver + added, 'last', last)
  local s = 9 + n * 4
  for k = 0, nset - 1 do
    redis.call('HSET', KEYS[4], ARGV[s + 2 * k], ARGV[s + 2 * k + 1])
  end
  local d = s + 2 * nset
  for k = 0, ndel - 1 do
    redis.call('HDEL', KEYS[4], ARGV[d + k])
  end
  local ttl = tonumber(ARGV[3])
  for k = 1, 4 do
    if redis.call('EXISTS', KEYS[k]) == 1 then redis.call('EXPIRE', KEYS[k], ttl) end
  end
end
return {ids, added}
"""

# Fields of the progress hash besides `ver`, `last` and `shown`: the fold state in parts.
META, PLAN, NODE = "meta", "plan", "n:"


@dataclass(frozen=True)
class Entry:
    """One stored event as read back: enough to frame it without parsing the JSON."""

    id: str
    event_type: str
    terminal: bool
    data: str

    @property
    def key(self) -> tuple[int, int]:
        return id_key(self.id)


@dataclass(frozen=True)
class Page:
    """A history read: `trimmed` is the newest id ever trimmed away (None if none)."""

    trimmed: str | None
    entries: list[Entry]


@dataclass(frozen=True)
class Appended:
    """Result of an append: ids in input order and the events that were new."""

    ids: list[str]
    new_events: list[Event]
    state: progress.FoldState  # the progress fold after these events
    # Durations these events finished, for the history: (definition, node, type, seconds).
    history: list[tuple[str | None, str, str | None, float]]


class AppendConflict(Exception):
    """Another writer appended to the workflow between our read and our script (retried)."""


def id_key(event_id: str) -> tuple[int, int]:
    """Comparable form of a stored id; stored ids are always well-formed."""
    parsed = parse_event_id(event_id)
    if parsed is None:
        raise ValueError(f"not a stream id: {event_id!r}")
    return parsed


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


def _entry(raw_id: Any, fields: Any) -> Entry:
    def get(name: str) -> str:
        value = fields.get(name.encode(), fields.get(name))
        return value.decode() if isinstance(value, bytes) else str(value)

    event_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
    return Entry(event_id, get("t"), get("x") == "1", get("d"))


class Store:
    """All Redis reads and writes of workflow events."""

    def __init__(
        self,
        redis: AnyRedis,
        *,
        maxlen: int,
        retention_seconds: int,
    ) -> None:
        self.redis = redis
        self.maxlen = maxlen
        self.retention_seconds = retention_seconds
        # Redis Cluster: sharded pub/sub keeps a channel on its workflow's shard.
        self.publish_command = "SPUBLISH" if isinstance(redis, RedisCluster) else "PUBLISH"
        self._append = redis.register_script(APPEND_LUA)

    async def append(
        self, workflow_id: str, events: Sequence[Event], *, attempts: int = 20
    ) -> Appended:
        """Store `events` atomically (all or none), publish them, advance the progress fold."""
        for _ in range(attempts):
            try:
                return await self._append_once(workflow_id, events)
            except AppendConflict:
                continue
        raise AppendConflict(f"workflow {workflow_id}: too many concurrent writers")

    async def _append_once(self, workflow_id: str, events: Sequence[Event]) -> Appended:
        # Read only the parts of the fold state these events touch (all of it for a plan or
        # a terminal state), so an append costs O(its events), not O(nodes).
        wanted: set[str] = set()
        touched: set[str] | None = wanted
        for event in events:
            nodes = progress.touched_nodes(event)
            if nodes is None:
                touched = None
                break
            wanted.update(nodes)
        node_fields = [NODE + n for n in touched or ()]
        keys_wanted = [e.idempotency_key for e in events if e.idempotency_key]
        pkey = progress_key(workflow_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            if touched is None:
                pipe.hgetall(pkey)
            else:
                pipe.hmget(pkey, ["ver", META, *node_fields])
            if keys_wanted:
                pipe.hmget(idempotency_key(workflow_id), keys_wanted)
            replies = await pipe.execute()
        if touched is None:
            fields = {_text(k): v for k, v in replies[0].items()}
        else:
            fields = dict(zip(["ver", META, *node_fields], replies[0], strict=True))
        known = {
            k for k, v in zip(keys_wanted, replies[1] if keys_wanted else [], strict=True) if v
        }

        # Only events the script will really store are folded; a key repeated in the batch
        # stores once.
        new_events: list[Event] = []
        seen = set(known)
        for event in events:
            key = event.idempotency_key
            if key and key in seen:
                continue
            if key:
                seen.add(key)
            new_events.append(event)

        before_nodes = {f[len(NODE) :] for f, v in fields.items() if f.startswith(NODE) and v}
        meta = fields.get(META)
        state = (
            progress.loads_parts(
                meta, fields.get(PLAN), {n: fields[NODE + n] for n in before_nodes}
            )
            if meta
            else progress.new_state()
        )
        history: list[tuple[str | None, str, str | None, float]] = []
        for event in new_events:
            history += progress.history_items(state, event)  # before fold updates it
            state = progress.fold(state, event)

        updates: list[Any] = [META, progress.dumps_meta(state)]
        deletes: list[str] = []
        if touched is None:
            updates += [PLAN, progress.dumps_plan(state)]
            deletes = [NODE + n for n in before_nodes - state.nodes.keys()]
        for node_id in state.nodes if touched is None else touched & state.nodes.keys():
            updates += [NODE + node_id, progress.dumps_node(state.nodes[node_id])]

        args: list[Any] = [
            channel(workflow_id),
            self.maxlen,
            self.retention_seconds,
            self.publish_command,
            int(fields.get("ver") or 0),
            len(events),
            len(updates) // 2,
            len(deletes),
        ]
        for event in events:
            args += [
                event.idempotency_key or "",
                event.event_type,
                "1" if event.is_terminal else "0",
                to_json(event),
            ]
        args += updates + deletes
        ids_raw, added = await self._append(keys=workflow_keys(workflow_id), args=args)
        if added == -1:
            raise AppendConflict(workflow_id)
        return Appended([_text(i) for i in ids_raw], new_events, state, history)

    async def read_after(self, workflow_id: str, after: str | None, count: int) -> Page:
        """Up to `count` retained events after `after`, and what was trimmed, as one snapshot.

        Reading both atomically is what makes gap announcements exact: the page holds every
        retained event after `after` exactly when nothing newer than `after` was trimmed.
        """
        start = "-" if after is None else "(" + after
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(trimmed_key(workflow_id))
            pipe.xrange(stream_key(workflow_id), min=start, max="+", count=count)
            trimmed, rows = await pipe.execute()
        return Page(
            trimmed.decode() if isinstance(trimmed, bytes) else trimmed,
            [_entry(raw_id, fields) for raw_id, fields in rows],
        )

    async def last_entry(self, workflow_id: str) -> Entry | None:
        """The newest retained event, or None."""
        rows = await self.redis.xrevrange(stream_key(workflow_id), max="+", min="-", count=1)
        if not rows:
            return None
        raw_id, fields = rows[0]
        return _entry(raw_id, fields)

    async def load_progress(self, workflow_id: str) -> StoredProgress | None:
        """The whole fold state, last event id and what was last shown; None when unknown."""
        raw = await self.redis.hgetall(progress_key(workflow_id))
        fields = {_text(k): _bytes(v) for k, v in raw.items()}
        meta = fields.get(META)
        if not meta:
            return None
        nodes = {f[len(NODE) :]: v for f, v in fields.items() if f.startswith(NODE)}
        state = progress.loads_parts(meta, fields.get(PLAN), nodes)
        last = fields.get("last")
        return StoredProgress(state, _text(last) if last else None, fields.get("shown"))

    async def save_shown(self, workflow_id: str, shown: bytes) -> None:
        """Remember what a poll showed, so every process smooths from the same place."""
        key = progress_key(workflow_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, "shown", shown)
            pipe.expire(key, self.retention_seconds)
            await pipe.execute()
