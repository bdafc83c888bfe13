"""Redis layout of a workflow, the atomic append script, and reads after an id."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

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
# ARGV: channel, maxlen, ttl, publish command, expected ver ('' = any), fold state ('' = keep),
#       event count, then 4 per event: idempotency key ('' = none), event_type, terminal, json.
# Returns {ids, added}: `ids` in input order; a known idempotency key returns its first id.
APPEND_LUA = """
local ver = tonumber(redis.call('HGET', KEYS[4], 'ver') or '0')
if ARGV[5] ~= '' and ver ~= tonumber(ARGV[5]) then
  return {{}, -1}
end
local n = tonumber(ARGV[7])
local ids = {}
local added = 0
local last = false
for i = 0, n - 1 do
  local b = 8 + i * 4
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
  if ARGV[6] ~= '' then redis.call('HSET', KEYS[4], 'fold', ARGV[6]) end
  local ttl = tonumber(ARGV[3])
  for k = 1, 4 do
    if redis.call('EXISTS', KEYS[k]) == 1 then redis.call('EXPIRE', KEYS[k], ttl) end
  end
end
return {ids, added}
"""


class Folder(Protocol):
    """The progress fold as the store needs it (server.progress satisfies it)."""

    def new_state(self) -> Any: ...
    def fold(self, state: Any, event: Event) -> Any: ...
    def dumps_state(self, state: Any) -> bytes: ...
    def loads_state(self, data: bytes) -> Any: ...
    def history_items(
        self, state_before: Any, event: Event
    ) -> list[tuple[str | None, str, str | None, float]]: ...


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
    state: Any  # the progress fold after these events (None without a folder)
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
        folder: Folder | None = None,
        sharded: bool = False,
    ) -> None:
        self.redis = redis
        self.maxlen = maxlen
        self.retention_seconds = retention_seconds
        self.folder = folder
        # Redis Cluster: sharded pub/sub keeps a channel on its workflow's shard.
        self.publish_command = "SPUBLISH" if sharded else "PUBLISH"
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
        keys_wanted = [e.idempotency_key for e in events if e.idempotency_key]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(progress_key(workflow_id), ["ver", "fold"])
            if keys_wanted:
                pipe.hmget(idempotency_key(workflow_id), keys_wanted)
            replies = await pipe.execute()
        ver_raw, fold_raw = replies[0]
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

        state: Any = None
        fold_arg = b""
        history: list[tuple[str | None, str, str | None, float]] = []
        if self.folder is not None and new_events:
            state = self.folder.loads_state(fold_raw) if fold_raw else self.folder.new_state()
            for event in new_events:
                history += self.folder.history_items(state, event)  # before fold updates it
                state = self.folder.fold(state, event)
            fold_arg = self.folder.dumps_state(state)

        args: list[Any] = [
            channel(workflow_id),
            self.maxlen,
            self.retention_seconds,
            self.publish_command,
            int(ver_raw or 0),
            fold_arg,
            len(events),
        ]
        for event in events:
            args += [
                event.idempotency_key or "",
                event.event_type,
                "1" if event.is_terminal else "0",
                to_json(event),
            ]
        ids_raw, added = await self._append(keys=workflow_keys(workflow_id), args=args)
        if added == -1:
            raise AppendConflict(workflow_id)
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in ids_raw]
        return Appended(ids, new_events, state, history)

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

    async def load_progress(
        self, workflow_id: str
    ) -> tuple[bytes | None, str | None, bytes | None]:
        """The stored fold state, last event id and what was last shown (None when unknown)."""
        fold, last, shown = await self.redis.hmget(
            progress_key(workflow_id), ["fold", "last", "shown"]
        )
        return (
            fold.encode() if isinstance(fold, str) else fold,
            last.decode() if isinstance(last, bytes) else last,
            shown.encode() if isinstance(shown, str) else shown,
        )

    async def save_shown(self, workflow_id: str, shown: bytes) -> None:
        """Remember what a poll showed, so every process smooths from the same place."""
        key = progress_key(workflow_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, "shown", shown)
            pipe.expire(key, self.retention_seconds)
            await pipe.execute()
