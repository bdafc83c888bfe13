"""The event log: appends (group commit per workflow, the compare-and-set retry loop around
the append script), reads after an id, the last entry, and the progress hash's reads.

The key names are in redis_keys, the script and how it is sent in append_script (and
lua/append.lua), the fold state's parts and this process's cache of them in
progress.parts.

About 580 lines, over the 400 aimed at: the append path (append, _append_group,
_append_events, _try, _run_append) is one protocol whose steps share the per-workflow
queue, the cache and the replica settings of one Store; cut apart, each piece would need
the others' state passed in, and the order of its awaits (which the round-trip count and
the group commit depend on) would be spread over modules.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import pydantic_core
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    RedisError,
    ResponseError,
)

from server import progress, sse
from server.append_script import (
    APPEND_LUA,
    TOUCH_LUA,
    AppendArgs,
    Encoded,
    RedisClock,
    append_args,
    encode_events,
    eval_then_wait,
)
from server.models import Event, parse_event_id
from server.progress import parts
from server.progress.parts import HistoryItem
from server.redis_client import AnyRedis, closed_under
from server.redis_keys import idempotency_key, progress_key, stream_key, trimmed_key

logger = logging.getLogger(__name__)


# KEYS: progress. ARGV: shown. Sets `shown` only on a hash that still exists.
SAVE_SHOWN_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'shown', ARGV[1]) end
"""


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

    @cached_property
    def sse(self) -> bytes:
        """Its SSE frame, made once: streams that catch up together share the entry."""
        return sse.encode_event(self.id.encode(), self.event_type.encode(), self.data.encode())


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
    # Durations these events finished, for the history.
    history: list[HistoryItem]


class _Written(NamedTuple):
    """What one script stored: ids in input order, the new events, their history items
    each with its event's index in the script's input."""

    ids: list[str]
    new_events: list[Event]
    history: list[tuple[int, HistoryItem]]


class AppendConflict(Exception):
    """Other processes kept appending to the workflow between our read and our script."""


class AppendUnknown(RedisError):
    """The append script was sent but Redis did not answer: it may or may not have run.

    The script carries a deadline (see RedisClock), so a Redis that was frozen and runs it
    later refuses it; what stays unknown is a script Redis ran just before that deadline
    whose answer was lost. A retry with the same idempotency keys stores nothing twice.
    """


class AppendNotReplicated(AppendUnknown):
    """The append is on the primary, but fewer replicas than MIN_REPLICAS_ACK confirmed it
    in time (Redis WAIT): a failover now could lose it. A retry with the same idempotency
    keys stores nothing twice and is answered once enough replicas hold the events."""


class AppendExpired(RedisError):
    """Redis got to the append script only after its deadline and refused it: not stored."""


@dataclass(slots=True)
class _Pending:
    """An append waiting for its workflow's writer; the future says `lead` or the result."""

    events: Sequence[Event]
    done: asyncio.Future[Appended | None]  # None: this one leads the next group


# Appends of one workflow in one process are written one script at a time, and those that
# queue meanwhile go together in the next script (group commit): concurrent publishers never
# race each other's compare-and-set, and a burst costs one round trip, not one per request.
GROUP_EVENTS = 1_000  # events in one script at most (a request's own batch may be larger)
# Idempotency keys a workflow remembers at least (and HISTORY_MAXLEN if more): a retry of an
# event older than that many keyed events is stored again.
IDEMPOTENCY_KEYS = 10_000
# After this many lost compare-and-sets to other processes, back off a little at random.
CONFLICT_ATTEMPTS = 200
# How long an append waits for MIN_REPLICAS_ACK replicas (Redis WAIT) without a command
# deadline to fit in (Redis Cluster); with one, what the append script is given (4 of 5 s).
REPLICA_WAIT_SECONDS = 4.0


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


def _entry(raw_id: Any, fields: Any) -> Entry:
    def get(name: str) -> str:
        value = fields.get(name.encode(), fields.get(name))
        return value.decode() if isinstance(value, bytes) else str(value)

    event_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
    return Entry(event_id, get("t"), get("x") == "1", get("d"))


def _prepare(
    state: progress.FoldState,
    events: Sequence[Event],
    known: dict[str, str],
    touched: set[str] | None,
    encoded: Encoded | None,
    with_delta: bool,
) -> tuple[parts.Folded, Encoded, bytes, bytes]:
    """parts.fold_parts(), and what the script takes of it: the events encoded (unless
    `encoded`, by an attempt that lost its compare-and-set), and the fields to set and
    delete, as JSON."""
    folded = parts.fold_parts(state, events, known, touched, with_delta=with_delta)
    if encoded is None:
        encoded = encode_events(events)
    # Strings (field names) and bytes (parts, UTF-8 JSON) alike become JSON strings.
    sets, dels = pydantic_core.to_json(folded.updates), pydantic_core.to_json(folded.deletes)
    return folded, encoded, sets, dels


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class Store:
    """All Redis reads and writes of workflow events."""

    def __init__(
        self,
        redis: AnyRedis,
        *,
        maxlen: int,
        retention_seconds: int,
        cache_nodes: int = parts.CACHE_NODES,
        min_replicas_ack: int = 0,
    ) -> None:
        self.redis = redis
        self.maxlen = maxlen
        self.retention_seconds = retention_seconds
        # Fold state of the workflows this process wrote last, by workflow id (see append).
        self.cache = parts.ProgressCache(cache_nodes)
        self._queues: dict[str, deque[_Pending]] = {}  # workflow -> appends of its writer
        self._reads: dict[tuple[str, str | None, int, bool], asyncio.Future[Page]] = {}
        self.clock = RedisClock(redis)
        self.idempotency_keys = max(maxlen, IDEMPOTENCY_KEYS)
        # Redis Cluster: sharded pub/sub keeps a channel on its workflow's shard.
        self.publish_command = "SPUBLISH" if isinstance(redis, RedisCluster) else "PUBLISH"
        self._append = redis.register_script(APPEND_LUA)
        self._save_shown = redis.register_script(SAVE_SHOWN_LUA)
        # MIN_REPLICAS_ACK: an append is answered once this many replicas hold it.
        self.min_replicas_ack = min_replicas_ack
        self.replica_wait_ms = max(1, int(1000 * (self.clock.budget or REPLICA_WAIT_SECONDS)))
        # Appends that found another process's append in between: merged by the script, or
        # answered with the parts to fold again (a lost compare-and-set). Read by /metrics.
        self.merged = 0
        self.refolded = 0
        self.shared = parts.SharedWorkflows()  # whose appends send a Delta, to merge

    async def append(self, workflow_id: str, events: Sequence[Event]) -> Appended:
        """Store `events` atomically (all or none), publish them, advance the progress fold.

        One script at a time per workflow in this process: an append that arrives while one
        is in flight waits, and every append waiting when it ends goes into the next script
        together (each still all or nothing, its ids in its own input order).
        """
        mine = _Pending(events, asyncio.get_running_loop().create_future())
        queue = self._queues.get(workflow_id)
        if queue is None:
            self._queues[workflow_id] = queue = deque()
            queue.append(mine)
        else:
            queue.append(mine)
            result = await mine.done
            if result is not None:
                return result
        # This append leads: it writes the group at the front of the queue (its own first).
        group: list[_Pending] = []
        size = 0
        while queue and (not group or size + len(queue[0].events) <= GROUP_EVENTS):
            pending = queue.popleft()
            if pending is mine or not pending.done.done():  # skip the cancelled
                group.append(pending)
                size += len(pending.events)
        try:
            results = await self._append_group(workflow_id, group)
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else AppendUnknown(repr(exc))
            for pending in group[1:]:
                if not pending.done.done():
                    pending.done.set_exception(failure)
            raise
        finally:
            while queue and queue[0].done.done():  # cancelled while waiting: not written
                queue.popleft()
            if queue:
                queue[0].done.set_result(None)  # the next one leads
            else:
                del self._queues[workflow_id]
                self.cache.released(workflow_id)
        for pending, result in zip(group[1:], results[1:], strict=True):
            if not pending.done.done():
                pending.done.set_result(result)
        return results[0]

    async def _append_group(self, workflow_id: str, group: list[_Pending]) -> list[Appended]:
        """Append the events of `group` in one script; one result per member."""
        events = [e for pending in group for e in pending.events]
        ids, new_events, history = await self._append_events(workflow_id, events)
        if len(group) == 1:
            return [Appended(ids, new_events, [item for _, item in history])]
        new = {id(e) for e in new_events}
        results: list[Appended] = []
        start = 0
        for pending in group:
            end = start + len(pending.events)
            results.append(
                Appended(
                    ids[start:end],
                    [e for e in pending.events if id(e) in new],
                    [item for i, item in history if start <= i < end],
                )
            )
            start = end
        return results

    async def _append_events(self, workflow_id: str, events: Sequence[Event]) -> _Written:
        """One atomic append; `history` pairs each item with its event's index in `events`.

        One round trip when this process holds the workflow's current fold state (it wrote
        the last append): the script's compare-and-set on `ver` and `last` proves it is
        current. Otherwise, or when another process got in between, the parts are read first
        (or come back in the script's conflict answer) and the fold is done again.
        """
        touched = parts.touched_by(events)
        # The events as the script takes them. Encoded before the view is taken (but for a
        # plan, which may go to a thread): the shorter the time from view to script, the
        # less often another process's append gets in between.
        wire = [] if touched is None else [encode_events(events)]
        view, usable = self.cache.take(workflow_id, touched)
        strict = True  # a cached view knows nothing of idempotency keys: the script checks
        known: dict[str, str] = {}  # idempotency key -> the id it was stored under
        if view is None or not usable:
            view, known = await self._read(workflow_id, events, touched, view)
            strict = False
        for attempt in range(CONFLICT_ATTEMPTS):
            if known and all(e.idempotency_key in known for e in events):
                # Every event is stored already (a retry, or legacy ingest by several
                # processes): nothing to write, so nothing to compare-and-set.
                self.cache.keep(workflow_id, view)
                if self.min_replicas_ack:
                    # A retry after a 503: answered once the replicas hold what it retries.
                    await self._replicated(workflow_id)
                return _Written(
                    [known[e.idempotency_key] for e in events if e.idempotency_key], [], []
                )
            try:
                done = await self._try(
                    workflow_id, events, touched, view, known, wire, strict=strict
                )
            except (AppendUnknown, AppendExpired):
                # Perhaps a failover: the new primary's clock may differ from the old one's.
                self.clock.offset = None
                raise
            if isinstance(done, _Written):
                return done
            view, known = done
            strict = False
            if attempt >= 2:
                # Several processes writing the same workflow at once: spread their retries
                # so that one of them wins each round instead of all of them losing.
                await asyncio.sleep(random.uniform(0, 0.001 * min(attempt, 20)))
        raise AppendConflict(f"workflow {workflow_id}: too many concurrent writers")

    def follow(self, workflow_id: str, message: bytes) -> None:
        """What another process's append wrote to a workflow's progress hash, as published
        on its live channel (the hub hands it over): see ProgressCache.follow."""
        self.cache.follow(workflow_id, message, held=workflow_id in self._queues)

    async def _read(
        self,
        workflow_id: str,
        events: Sequence[Event],
        touched: set[str] | None,
        prior: parts.View | None,
    ) -> tuple[parts.View, dict[str, str]]:
        """Read the parts of the fold state these events touch, and their known keys.

        A `prior` view that is still current gains the nodes read (parts.grown).
        """
        # Only the parts the events touch (all of it for a plan or a terminal state), so an
        # append costs O(its events), not O(nodes).
        names = parts.read_fields(touched)
        keys_wanted = [e.idempotency_key for e in events if e.idempotency_key]
        pkey = progress_key(workflow_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            if names is None:
                pipe.hgetall(pkey)
            else:
                pipe.hmget(pkey, names)
            if keys_wanted:
                pipe.hmget(idempotency_key(workflow_id), keys_wanted)
            replies = await pipe.execute()
        if names is None:
            fields = {_text(k): v for k, v in replies[0].items()}
        else:
            fields = dict(zip(names, replies[0], strict=True))
        known = {
            k: _text(v)
            for k, v in zip(keys_wanted, replies[1] if keys_wanted else [], strict=True)
            if v
        }
        return parts.grown(prior, parts.view_from(fields, touched)), known

    async def _try(
        self,
        workflow_id: str,
        events: Sequence[Event],
        touched: set[str] | None,
        view: parts.View,
        known: dict[str, str],
        wire: list[Encoded],
        *,
        strict: bool,
    ) -> _Written | tuple[parts.View, dict[str, str]]:
        """Fold into `view` and run the script: the result, or the fresh view on a conflict.

        `wire` holds the events as encoded by the first attempt (it fills it): they do not
        depend on the state, so an attempt after a lost compare-and-set only folds again."""
        encoded = wire[0] if wire else None
        if touched is None and parts.fold_weight(view.state, events) > parts.THREAD_NODES:
            # A big plan's fold and parts cost 100+ ms of CPU: in a worker thread the event
            # loop keeps serving the other streams meanwhile (the view is ours alone).
            # Its stored JSON is made there too (10 ms for a 4 MiB plan).
            prepared = await asyncio.to_thread(
                _prepare, view.state, events, known, touched, encoded, False
            )
        else:
            # A key already stored would leave the script to skip an event this fold
            # counted: such an append compares and folds again instead of merging.
            with_delta = not known and workflow_id in self.shared
            prepared = _prepare(view.state, events, known, touched, encoded, with_delta)
        folded, encoded, sets, deletes = prepared
        state, new_events, history = folded.state, folded.new_events, folded.history
        if not wire:
            wire.append(encoded)
        names = parts.read_fields(touched)
        keys, argv = append_args(
            AppendArgs(
                workflow_id=workflow_id,
                maxlen=self.maxlen,
                ttl=self.retention_seconds,
                publish_command=self.publish_command,
                ver=view.ver,
                count=len(events),
                nset=len(folded.updates) // 2,
                ndel=len(folded.deletes),
                last=view.last if strict else "",
                strict=strict,
                read=names,
                deadline_ms=await self.clock.deadline_ms(),
                keep_keys=self.idempotency_keys,
                events=encoded,
                sets=sets,
                deletes=deletes,
                publish_parts=touched is not None,
                delta=folded.delta,
            )
        )
        try:
            reply = await self._run_append(workflow_id, keys, argv)
        except ResponseError:
            raise  # Redis refused the script itself: it did not run
        except AppendUnknown:
            raise
        except (RedisError, OSError) as exc:
            raise AppendUnknown(f"Redis did not answer the append: {exc}") from exc
        except (AttributeError, TypeError) as exc:
            # A connection closed under the script, on a path the clients' own conversion
            # does not cover (EVAL + WAIT on a cluster node): as lost as a ConnectionError.
            if (lost := closed_under(exc)) is None:
                raise
            raise AppendUnknown(f"Redis did not answer the append: {lost}") from exc
        ids_raw, added = reply[0], reply[1]
        if added == -2:
            raise AppendExpired("Redis ran the append after its deadline and refused it")
        if added == -1:
            self.refolded += 1
            self.shared.mark(workflow_id)
            got, known_raw = reply[2], reply[3]
            if names is None:
                fields = {_text(got[i]): got[i + 1] for i in range(0, len(got), 2)}
            else:
                fields = dict(zip(names, got, strict=True))
            fresh = {
                e.idempotency_key: _text(v)
                for e, v in zip(events, known_raw, strict=True)
                if e.idempotency_key and v
            }
            return parts.view_from(fields, touched), fresh
        if reply[3] is not None and touched is not None:  # merged onto another's append
            self.merged += 1
            self.shared.mark(workflow_id)
            meta = _bytes(reply[3])
            view = parts.merged_view(int(reply[4]), _text(reply[2]), meta, state, touched)
            self.cache.keep(workflow_id, view)
            return _Written([_text(i) for i in ids_raw], new_events, history)
        # The view is ours alone until cached: updated in place, not rebuilt, so an append
        # leaves no new long-lived objects for the garbage collector to scan.
        if added:
            view.ver, view.last = view.ver + added, _text(reply[2])
        view.state = state
        if view.nodes is not None and touched:
            view.nodes |= touched
        self.cache.keep(workflow_id, view)
        return _Written([_text(i) for i in ids_raw], new_events, history)

    async def _run_append(self, workflow_id: str, keys: list[str], args: list[Any]) -> Any:
        """The append script; with MIN_REPLICAS_ACK, and WAIT for the replicas after it on
        the same connection (WAIT counts that connection's writes), so a group of appends
        costs one WAIT. Raises AppendNotReplicated when too few replicas confirmed."""
        if not self.min_replicas_ack:
            return await self._append(keys=keys, args=args)
        reply, acked = await self._waited(APPEND_LUA, keys, args)
        if reply[1] > 0:
            self._check_acked(acked)
        elif reply[1] == 0 and reply[0]:
            await self._replicated(workflow_id)  # every event was known: nothing written now
        return reply

    async def _replicated(self, workflow_id: str) -> None:
        """Return once MIN_REPLICAS_ACK replicas hold everything written to the workflow so
        far (a replicated no-op write, then WAIT); else raise AppendNotReplicated."""
        _, acked = await self._waited(TOUCH_LUA, [progress_key(workflow_id)], [])
        self._check_acked(acked)

    def _check_acked(self, acked: Any) -> None:
        if isinstance(acked, Exception) or acked < self.min_replicas_ack:
            got = f"failed ({acked})" if isinstance(acked, Exception) else f"{acked} confirmed"
            raise AppendNotReplicated(
                f"stored on the primary, but of the {self.min_replicas_ack} replicas "
                f"MIN_REPLICAS_ACK asks for, {got} within {self.replica_wait_ms} ms"
            )

    async def _waited(self, script: str, keys: list[str], args: list[Any]) -> tuple[Any, Any]:
        return await eval_then_wait(
            self.redis, script, keys, args, self.min_replicas_ack, self.replica_wait_ms
        )

    async def read_after(
        self, workflow_id: str, after: str | None, count: int, *, inclusive: bool = False
    ) -> Page:
        """Up to `count` retained events after `after`, and what was trimmed, as one snapshot.

        Reading both atomically is what makes gap announcements exact: the page holds every
        retained event after `after` exactly when nothing newer than `after` was trimmed.
        `inclusive`: `after` itself too, when it is stored (so a reader learns whether it is).
        """
        # Streams sent to catch up together (a hub ring overflow resyncs every stream of a
        # workflow at once) ask the same: one read, not one per stream. Only a read not
        # sent yet is shared, so each caller's read is sent after it asked.
        request = (workflow_id, after, count, inclusive)
        shared = self._reads.get(request)
        if shared is None:
            shared = self._reads[request] = asyncio.ensure_future(self._read_page(request))
            shared.add_done_callback(_retrieved)  # every caller may have left meanwhile
        return await asyncio.shield(shared)

    async def _read_page(self, request: tuple[str, str | None, int, bool]) -> Page:
        del self._reads[request]  # from now on a new caller sends a read of its own
        workflow_id, after, count, inclusive = request
        start = "-" if after is None else after if inclusive else "(" + after
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

    async def progress_head(self, workflow_id: str) -> tuple[str | None, bytes | None] | None:
        """The last event id and what was last shown, without the fold; None when unknown."""
        ver, last, shown = await self.redis.hmget(
            progress_key(workflow_id), ["ver", "last", "shown"]
        )
        if ver is None:
            return None
        return (_text(last) if last else None), (_bytes(shown) if shown else None)

    async def load_progress(
        self,
        workflow_id: str,
        *,
        parse: Callable[[Callable[[], progress.FoldState], int], Awaitable[progress.FoldState]]
        | None = None,
    ) -> parts.StoredProgress | None:
        """The whole fold state, last event id and what was last shown; None when unknown.

        `parse` runs the parsing of the parts (given it and the number of nodes), so that a
        caller may move a big state's parsing off the event loop.
        """
        raw = await self.redis.hgetall(progress_key(workflow_id))
        fields = {_text(k): _bytes(v) for k, v in raw.items()}
        stored = parts.loads_stored(fields)
        if stored is None:
            return None
        meta, plan, nodes = stored

        def parsed() -> progress.FoldState:
            return progress.loads_parts(meta, plan, nodes)

        state = parsed() if parse is None else await parse(parsed, len(nodes))
        last = fields.get("last")
        return parts.StoredProgress(state, _text(last) if last else None, fields.get("shown"))

    async def save_shown(self, workflow_id: str, shown: bytes) -> None:
        """Remember what a poll showed, so every process smooths from the same place.

        A read must not extend the workflow's life: HSET keeps the expiry the last append
        set, and a hash that expired since the read is not created again (atomically).
        """
        await self._save_shown(keys=[progress_key(workflow_id)], args=[shown])
