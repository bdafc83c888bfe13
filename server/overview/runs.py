"""The run index: which workflows are known, most recently updated first, by state and
definition, for `GET /workflows` and its live overview.

Layout. The index is split over SHARDS hash tags `{wfsse:runs:<k>}` (a workflow's shard is
a hash of its id), so on Redis Cluster the index spreads over the masters like the
workflows do; a single Redis holds one shard. Per shard:
- `all`, `s:<state>`, `d:<definition>`, `d:<definition>:s:<state>`: sorted sets of
  workflow ids, the filters' answers without a scan (`-` is the state of a run that has
  none yet);
- `rec`: a hash, workflow id -> its index record (JSON): state, definition, score, the
  event id each was last set by, and its recent moves (see below).
The score is the time (ms, Redis's clock as the script runs) of the run's last index write,
times 2^11, plus an 11-bit hash of its id: one order over all shards (Redis orders equal
scores by id).

Writes. An append costs the index nothing unless a field the index sorts or filters by
changes: the run's state, its definition, or the second of its last event (so a run
busy with 1,000 events a second writes the index once a second, and the order is that of
the last update to within a second). The write is its own
script on the index shard (the workflow's keys live elsewhere), after the append; a
failed index write leaves the event stored and is logged and counted. Every field
carries the id of the event that set it, and an older id never overwrites a newer one,
so two processes' writes converge whatever order they land in.

Paging. A walk is a snapshot as of its first page's time `T` (in its cursor): each run
is listed where it stood at T, once. A run updated during the walk has moved above T;
its record keeps its moves of the last CURSOR_SECONDS, so the page script finds where it
stood at T and lists it there, not again at the top and not never. A cursor older than
that is refused (400), and the client starts again.

Expiry. A run is forgotten when its keys expire: an entry older than RETENTION_SECONDS
is skipped and removed by the page that meets it, and each index write removes two such
entries from the bottom, so dead runs leave at least as fast as new ones come.

Why one module of ~620 lines: about half is the two Lua scripts (write and page), whose
record layout, score and moves must match the Python that decodes them line for line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from server.models import Event, WorkflowPlanned, WorkflowStateChanged
from server.redis_keys import (
    PREFIX,
    channel,
    progress_key,
    runs_keys,
    runs_notice_id,
    runs_shard_tag,
)
from server.tasks import stop

logger = logging.getLogger(__name__)

SHARDS_CLUSTER = 16  # index shards on Redis Cluster; one on a single Redis
TIE_BITS = 1 << 11  # the score's low part: a hash of the workflow id
CURSOR_SECONDS = 300  # how long a walk's cursor stays valid
# Moves a run's record keeps (those of the last CURSOR_SECONDS): a run that changes state
# more often than this in that time may be listed out of its place in a walk.
MOVES_KEPT = 1_000
# Runs of a shard that moved since a walk began which a page looks up at most (each is a
# record read in the page script): past it the walk is refused (400) rather than Redis held.
MOVED_MAX = 2_000
NO_STATE = "-"
PAGE_DEFAULT, PAGE_MAX = 50, 200
# Workflows whose last indexed (state, definition, second) this process remembers, so that
# an append that changes none of them costs no index write.
CACHE_RUNS = 100_000
# Runs that only moved on to a new second are written together this often, at most
# FLUSH_RUNS to a script: a busy process writes the index a few times a second, not once
# per event of each slow run.
FLUSH_SECONDS = 0.2
FLUSH_RUNS = 500

# Shared by the scripts: the sets a record is in, and forgetting a run.
_COMMON_LUA = """
local B = 2048
local function sets(tag, s, d)
  local out = {tag .. ':all', tag .. ':s:' .. s}
  if d ~= '' then
    out[#out + 1] = tag .. ':d:' .. d
    out[#out + 1] = tag .. ':d:' .. d .. ':s:' .. s
  end
  return out
end
local function drop(tag, rec, m)
  local raw = redis.call('HGET', rec, m)
  if raw then
    local o = cjson.decode(raw)
    for _, k in ipairs(sets(tag, o.s, o.d)) do redis.call('ZREM', k, m) end
    redis.call('HDEL', rec, m)
  end
  redis.call('ZREM', tag .. ':all', m)
end
-- Redis's own clock: scores are times of the writes as Redis ran them, so a write that
-- lands after a walk's first page always scores above the walk's T (a client's clock
-- taken before an append's round trip would not).
local function redis_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function num(x)  -- a 16-digit score as Redis reads it (Lua would print 14 digits)
  return string.format('%.0f', x)
end
"""

# KEYS: the shard's `all` and `rec` (the filter sets are named from the same hash tag).
# ARGV: tag, '' (the time is Redis's), retention (ms), cursor window (ms), publish command,
# notice channel, moves kept at most; then per run 6: workflow id, event id, state ('' unchanged),
# definition set 0|1, definition, tie. Returns how many records changed.
_UPDATE_LUA = (
    _COMMON_LUA
    + """
local tag, now = ARGV[1], redis_ms()
local retention, window, kept = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[7])
local function idkey(s)
  local ms, seq = string.match(s, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function newer(a, b)
  local am, as = idkey(a)
  local bm, bs = idkey(b)
  return am > bm or (am == bm and as > bs)
end
local function update(wf, id, state, planned, def, tie)
  local raw = redis.call('HGET', KEYS[2], wf)
  local r = {s = '-', d = '', si = '0-0', di = '0-0', t = 0, h = {}}
  if raw then r = cjson.decode(raw) end
  local fresh = not raw
  local s, d = r.s, r.d
  if state ~= '' and newer(id, r.si) then s = state; r.si = id end
  if planned == '1' and newer(id, r.di) then d = def; r.di = id end
  -- Within the second of the last write only a new state or definition writes again.
  if not fresh and s == r.s and d == r.d and math.floor(now / 1000) <= math.floor(r.t / 1000) then
    return 0
  end
  local at = r.t
  if now > at then at = now end
  local score = num(at * B + tie)
  if s ~= r.s or d ~= r.d then
    for _, k in ipairs(sets(tag, r.s, r.d)) do redis.call('ZREM', k, wf) end
  end
  for _, k in ipairs(sets(tag, s, d)) do redis.call('ZADD', k, score, wf) end
  local h = r.h
  -- Every move is kept (a walk started between two of them needs the first), those older
  -- than a cursor lives but the newest of them, and at most MOVES_KEPT.
  h[#h + 1] = {at, s, d}
  while #h > 1 and (h[2][1] <= now - window or #h > kept) do table.remove(h, 1) end
  if fresh then r.c = at end
  local moved = s ~= r.s or d ~= r.d or fresh
  r.s, r.d, r.t, r.x, r.h = s, d, at, tie, h
  redis.call('HSET', KEYS[2], wf, cjson.encode(r))
  if moved then
    redis.call(ARGV[5], ARGV[6], id .. ' run 0 ' .. cjson.encode({workflow_id = wf, state = s}))
  end
  return 1
end
local changed = 0
for i = 8, #ARGV, 6 do
  changed = changed + update(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4],
                             tonumber(ARGV[i + 5]))
end
-- Two dead entries from the bottom per write: they leave as fast as new runs come.
local bottom = num((now - retention) * B)
local dead = redis.call('ZRANGE', KEYS[1], '-inf', bottom, 'BYSCORE', 'LIMIT', 0, 2)
for _, m in ipairs(dead) do drop(tag, KEYS[2], m) end
return changed
"""
)

# One page of one shard. KEYS: `all`, `rec`. ARGV: tag, T (ms; '' now), cursor score ('' none),
# cursor member, limit, '' (Redis's time), retention (ms), states (JSON list, [] any), definition,
# the most runs moved since T that it looks at (more: an error reply STALE).
# Returns T, then a flat list of workflow id, score (as of T): at most limit + 1 runs, best
# first.
_PAGE_LUA = (
    _COMMON_LUA
    + """
local tag = ARGV[1]
local now = redis_ms()
local T = now
if ARGV[2] ~= '' then T = tonumber(ARGV[2]) end
local cs, cm = ARGV[3], ARGV[4]
local limit, retention = tonumber(ARGV[5]), tonumber(ARGV[7])
local states, def = cjson.decode(ARGV[8]), ARGV[9]
-- What happened at T's own millisecond counts as after the walk began: a write in that
-- millisecond may have landed after this page was read.
local top = T * B - 1
local cscore = nil
if cs ~= '' then cscore = tonumber(cs) end
local function before(score, m)  -- strictly after the cursor in the walk's order
  if cscore == nil then return true end
  return score < cscore or (score == cscore and m < cm)
end
local wanted = {}
for _, st in ipairs(states) do wanted[st] = true end
local function matches(st, d)
  return (#states == 0 or wanted[st]) and (def == '' or d == def)
end
local zsets = {}
if #states == 0 then
  if def == '' then zsets = {tag .. ':all'} else zsets = {tag .. ':d:' .. def} end
else
  for _, st in ipairs(states) do
    if def == '' then zsets[#zsets + 1] = tag .. ':s:' .. st
    else zsets[#zsets + 1] = tag .. ':d:' .. def .. ':s:' .. st end
  end
end
local max = top
if cscore ~= nil and cscore < max then max = cscore end
local found = {}
local dead = {}
local oldest = (now - retention) * B
for _, z in ipairs(zsets) do
  local offset, got = 0, 0
  while got <= limit do
    local rows = redis.call('ZRANGE', z, num(max), '-inf', 'BYSCORE', 'REV',
      'LIMIT', offset, limit + 8, 'WITHSCORES')
    if #rows == 0 then break end
    for i = 1, #rows, 2 do
      local m, score = rows[i], tonumber(rows[i + 1])
      if score <= oldest then
        dead[#dead + 1] = m
      elseif before(score, m) then
        found[#found + 1] = {score, m}
        got = got + 1
      end
    end
    if #rows < 2 * (limit + 8) or #dead > 0 then break end
    offset = offset + limit + 8
  end
end
-- Runs that moved above T during the walk: listed where they stood at T.
local moved = redis.call('ZRANGE', KEYS[1], '(' .. num(top), '+inf', 'BYSCORE', 'LIMIT', 0,
  tonumber(ARGV[10]) + 1)
if #moved > tonumber(ARGV[10]) then return redis.error_reply('STALE') end
for _, m in ipairs(moved) do
  local raw = redis.call('HGET', KEYS[2], m)
  if raw then
    local r = cjson.decode(raw)
    local at = nil
    for _, e in ipairs(r.h) do if e[1] < T then at = e end end
    if at == nil and r.c ~= nil and r.c < T then
      at = {r.c, r.h[1][2], r.h[1][3]}  -- its moves before T are gone (MOVES_KEPT)
    end
    if at ~= nil and matches(at[2], at[3]) then
      local score = at[1] * B + r.x
      if score > oldest and before(score, m) then found[#found + 1] = {score, m} end
    end
  end
end
table.sort(found, function(a, b) return a[1] > b[1] or (a[1] == b[1] and a[2] > b[2]) end)
local out = {string.format('%.0f', T)}
local seen = {}
for _, f in ipairs(found) do
  if #out >= 2 * (limit + 1) + 1 then break end
  if not seen[f[2]] then
    seen[f[2]] = true
    out[#out + 1] = f[2]
    out[#out + 1] = string.format('%.0f', f[1])
  end
end
for _, m in ipairs(dead) do drop(tag, KEYS[2], m) end
return out
"""
)

# Forget runs (their keys are gone). KEYS: `all`, `rec`. ARGV: tag, workflow ids...
_FORGET_LUA = (
    _COMMON_LUA
    + """
local tag = ARGV[1]
for i = 2, #ARGV do drop(tag, KEYS[2], ARGV[i]) end
return 1
"""
)

# Redis's clock on the node of a shard (ms). KEYS: the shard's `all`.
_TIME_LUA = """
local t = redis.call('TIME')
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Records of given runs. KEYS: `rec`. ARGV: workflow ids. Returns their raw records.
_RECORDS_LUA = """
return redis.call('HMGET', KEYS[1], unpack(ARGV))
"""


class BadCursor(ValueError):
    """A cursor that is not one of ours, or too old to continue its walk."""


@dataclass(frozen=True)
class Cursor:
    """Where a walk stands: its snapshot time (ms), and the last run listed (score, id)."""

    at: int
    score: int
    workflow_id: str

    def encode(self) -> str:
        raw = json.dumps([self.at, self.score, self.workflow_id], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str, now: float) -> Cursor:
        try:
            padded = text + "=" * (-len(text) % 4)
            at, score, workflow_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
        except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
            raise BadCursor("cursor is not one this server gave out (use `next` as is)") from None
        if not (isinstance(at, int) and isinstance(score, int) and isinstance(workflow_id, str)):
            raise BadCursor("cursor is not one this server gave out (use `next` as is)")
        if at < (now - CURSOR_SECONDS) * 1000:
            raise BadCursor(
                f"cursor is older than {CURSOR_SECONDS} s: start the walk again without it"
            )
        return cls(at, score, workflow_id)


@dataclass(frozen=True)
class Listed:
    """A page of the index: workflow ids best first, and the cursor after them (or None)."""

    workflow_ids: list[str]
    next: Cursor | None


def tie(workflow_id: str) -> int:
    """The score's low part: a stable 20-bit hash of the id, so equal seconds do not tie."""
    return zlib.crc32(workflow_id.encode()) % TIE_BITS


def shard_of(workflow_id: str, shards: int) -> int:
    return zlib.adler32(workflow_id.encode()) % shards


def index_changes(events: Sequence[Event]) -> tuple[str | None, str | None, bool]:
    """The state and definition these events leave the run with, as far as they set them:
    (state or None if unchanged, definition or None, whether a plan set the definition)."""
    state: str | None = None
    definition: str | None = None
    planned = False
    for event in events:
        if isinstance(event, WorkflowStateChanged):
            state = event.to_state
        elif isinstance(event, WorkflowPlanned):
            definition, planned = event.definition_id, True
    return state, definition, planned


class RunIndex:
    """Writes and reads the run index (see the module's docstring)."""

    def __init__(
        self,
        redis: Any,
        *,
        retention_seconds: int,
        prefix: str = PREFIX,
        clock: Any = time.time,
        on_error: Callable[[], None] = lambda: None,
        on_write: Callable[[], None] = lambda: None,
    ) -> None:
        self.redis = redis
        self.retention_seconds = retention_seconds
        self.prefix = prefix
        self.clock = clock
        self.cluster = isinstance(redis, RedisCluster)
        self.shards = SHARDS_CLUSTER if self.cluster else 1
        self.publish_command = "SPUBLISH" if self.cluster else "PUBLISH"
        self._update = redis.register_script(_UPDATE_LUA)
        self._page = redis.register_script(_PAGE_LUA)
        self._forget = redis.register_script(_FORGET_LUA)
        self._records = redis.register_script(_RECORDS_LUA)
        self._time = redis.register_script(_TIME_LUA)
        # workflow -> (state, definition, second) as this process last wrote them
        self._written: OrderedDict[str, tuple[str | None, str | None, int]] = OrderedDict()
        self._missed: dict[str, tuple[str | None, str | None, bool]] = {}
        self._moves: dict[str, str] = {}  # runs that only moved on in time -> last id
        self._flusher: asyncio.Task[None] | None = None
        self.on_error = on_error
        self.on_write = on_write  # one update script sent

    def _keys(self, k: int) -> list[str]:
        return runs_keys(k, prefix=self.prefix)

    async def note(self, workflow_id: str, last_id: str, events: Sequence[Event]) -> bool:
        """After an append of `events` (the last stored as `last_id`): write the index if a
        field it sorts or filters by changed. A new state, a plan or a run new to this
        process is written before this returns; a run that only moved on to a new second
        goes with the next flush (FLUSH_SECONDS), many runs to a script. True when a write
        was sent or queued."""
        state, definition, planned = index_changes(events)
        missed = self._missed.pop(workflow_id, None)
        if missed is not None:  # what an index write that failed would have said
            state = state or missed[0]
            if not planned and missed[2]:
                definition, planned = missed[1], True
        now = int(self.clock() * 1000)
        known = self._written.get(workflow_id)
        if known is not None and state is None and not planned:
            self._written.move_to_end(workflow_id)
            if known[2] == now // 1000:
                return False
            self._written[workflow_id] = (known[0], known[1], now // 1000)
            self._moves[workflow_id] = last_id
            self._start_flusher()
            return True
        k = shard_of(workflow_id, self.shards)
        row = [
            workflow_id,
            last_id,
            state or "",
            "1" if planned else "0",
            definition or "",
            tie(workflow_id),
        ]
        try:
            await self._write(k, row)
        except BaseException:
            # Remembered for the next append's write, which may change nothing by itself.
            self._missed[workflow_id] = (state, definition, planned)
            self.on_error()
            raise
        self._moves.pop(workflow_id, None)  # written with the rest
        prev_state = known[0] if known is not None else None
        prev_def = known[1] if known is not None else None
        self._written[workflow_id] = (
            state or prev_state,
            definition if planned else prev_def,
            now // 1000,
        )
        self._written.move_to_end(workflow_id)
        while len(self._written) > CACHE_RUNS:
            self._written.popitem(last=False)
        return True

    async def _write(self, k: int, rows: list[Any]) -> None:
        """One update script on shard k for runs given 6 values each (see _UPDATE_LUA)."""
        tag = runs_shard_tag(k, prefix=self.prefix)
        await self._update(
            keys=self._keys(k),
            args=[
                tag,
                "",
                self.retention_seconds * 1000,
                CURSOR_SECONDS * 1000,
                self.publish_command,
                channel(runs_notice_id(k, prefix=self.prefix)),
                MOVES_KEPT,
                *rows,
            ],
        )
        self.on_write()

    def _start_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_SECONDS)
        await self.flush()

    async def flush(self) -> None:
        """Write the queued moves now, one script per shard; on a failure they wait for the
        next flush (a newer move of the same run replaces them)."""
        moves, self._moves = self._moves, {}
        if not moves:
            return
        by_shard: dict[int, list[Any]] = {}
        for w, last_id in moves.items():
            by_shard.setdefault(shard_of(w, self.shards), []).extend(
                [w, last_id, "", "0", "", tie(w)]
            )
        unwritten = dict(by_shard)
        for k, rows in by_shard.items():
            try:
                for i in range(0, len(rows), 6 * FLUSH_RUNS):
                    await self._write(k, rows[i : i + 6 * FLUSH_RUNS])
                del unwritten[k]
            except asyncio.CancelledError:
                # Stopped mid-flush (shutdown): what is not written yet goes back for
                # close()'s own flush (writing a move twice is harmless: ids decide).
                for left in unwritten.values():
                    for j in range(0, len(left), 6):
                        self._moves.setdefault(left[j], left[j + 1])
                raise
            except (RedisError, OSError) as exc:
                self.on_error()
                logger.info("run index: %d moves not written (%s); next flush", len(rows) // 6, exc)
                del unwritten[k]
                for j in range(0, len(rows), 6):
                    self._moves.setdefault(rows[j], rows[j + 1])
                self._start_flusher()

    async def close(self) -> None:
        """Write what is queued (a clean exit loses no move)."""
        await stop([self._flusher], what="run index")
        try:
            await self.flush()
        except (RedisError, OSError) as exc:
            logger.info("run index: queued moves not written at exit (%s)", exc)

    async def page(
        self,
        *,
        states: Sequence[str] = (),
        definition_id: str | None = None,
        limit: int = PAGE_DEFAULT,
        cursor: Cursor | None = None,
    ) -> Listed:
        """One page of the walk `cursor` continues (a new walk without one)."""
        if cursor is not None:
            at: int | str = cursor.at
        elif self.shards == 1:
            at = ""  # the page script takes Redis's time as the walk's T
        else:
            # The earliest of the shards' clocks: a write after this scores above it on
            # every shard, so it is a move in this walk, never a new place.
            times = await asyncio.gather(
                *(self._time(keys=self._keys(k)[:1]) for k in range(self.shards))
            )
            at = min(int(t) for t in times)
        args_tail = [
            at,
            "" if cursor is None else cursor.score,
            "" if cursor is None else cursor.workflow_id,
            limit,
            "",
            self.retention_seconds * 1000,
            json.dumps(list(states)),
            definition_id or "",
            MOVED_MAX,
        ]

        async def one(k: int) -> list[Any]:
            tag = runs_shard_tag(k, prefix=self.prefix)
            try:
                rows: list[Any] = await self._page(keys=self._keys(k), args=[tag, *args_tail])
            except ResponseError as exc:
                if "STALE" not in str(exc):
                    raise
                raise BadCursor(
                    f"more than {MOVED_MAX} runs of a shard changed since this walk began: "
                    "start it again without a cursor"
                ) from None
            return rows

        replies = await asyncio.gather(*(one(k) for k in range(self.shards)))
        walk_at = min(int(rows[0]) for rows in replies)
        found: list[tuple[int, str]] = []
        for rows in replies:
            for i in range(1, len(rows), 2):
                m = rows[i].decode() if isinstance(rows[i], bytes) else str(rows[i])
                found.append((int(rows[i + 1]), m))
        found.sort(reverse=True)
        chosen = found[:limit]
        more = len(found) > limit
        nxt = Cursor(walk_at, chosen[-1][0], chosen[-1][1]) if more and chosen else None
        return Listed([m for _, m in chosen], nxt)

    async def records(self, workflow_ids: Sequence[str]) -> dict[str, tuple[int, str, str]]:
        """The index's (score, state, definition) of these runs (those it knows)."""
        by_shard: dict[int, list[str]] = {}
        for w in workflow_ids:
            by_shard.setdefault(shard_of(w, self.shards), []).append(w)

        async def one(k: int, ids: list[str]) -> list[tuple[str, Any]]:
            tag = runs_shard_tag(k, prefix=self.prefix)
            raws = await self._records(keys=[f"{tag}:rec"], args=ids)
            return list(zip(ids, raws, strict=True))

        out: dict[str, tuple[int, str, str]] = {}
        for pairs in await asyncio.gather(*(one(k, ids) for k, ids in by_shard.items())):
            for w, raw in pairs:
                if raw:
                    r = json.loads(raw)
                    out[w] = (int(r["t"]) * TIE_BITS + int(r["x"]), str(r["s"]), str(r["d"]))
        return out

    async def sweep(self) -> int:
        """Forget every run whose keys are gone now (expiry does it lazily; a test suite
        cleaning up after itself does it at once). Returns how many were forgotten."""
        gone: list[str] = []
        for k in range(self.shards):
            # Pairs, not NOVALUES: that needs Redis 7.4.
            ids = [
                m.decode() if isinstance(m, bytes) else str(m)
                async for m, _ in self.redis.hscan_iter(self._keys(k)[1], count=1000)
            ]
            for i in range(0, len(ids), 1000):
                chunk = ids[i : i + 1000]
                async with self.redis.pipeline(transaction=False) as pipe:
                    for w in chunk:
                        pipe.exists(progress_key(w))
                    alive = await pipe.execute()
                gone += [w for w, n in zip(chunk, alive, strict=True) if not n]
        for i in range(0, len(gone), 1000):
            await self.forget(gone[i : i + 1000])
        return len(gone)

    async def forget(self, workflow_ids: Sequence[str]) -> None:
        """Remove runs from the index (their keys expired, or a test cleans up)."""
        by_shard: dict[int, list[str]] = {}
        for w in workflow_ids:
            by_shard.setdefault(shard_of(w, self.shards), []).append(w)
        for k, ids in by_shard.items():
            await self._forget(
                keys=self._keys(k), args=[runs_shard_tag(k, prefix=self.prefix), *ids]
            )
        for w in workflow_ids:
            self._written.pop(w, None)
