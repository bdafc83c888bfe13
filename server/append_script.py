"""The append script (lua/append.lua), loaded once; the one function that builds its
arguments, `append_args(AppendArgs(...))`; and how it is sent: with a deadline in Redis's
own clock (RedisClock) and, with MIN_REPLICAS_ACK, followed by WAIT on the same connection
(eval_then_wait).

The script's KEYS and ARGV are documented once, at the top of lua/append.lua; AppendArgs
names each of them, and append_args() lays them out in that order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple

from redis.asyncio import Redis
from redis.asyncio.cluster import PipelineCommand, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from server import redis_keys
from server.models import Event, to_json_bytes

logger = logging.getLogger(__name__)

# Live messages carry several events each, up to this many bytes (see lua/append.lua).
PUBLISH_BYTES = 64 * 1024


def _load(name: str) -> str:
    """A script shipped in the package (server/lua/, package data in the wheel)."""
    return (resources.files("server") / "lua" / name).read_text(encoding="utf-8")


APPEND_LUA = _load("append.lua").replace("PUBLISH_BYTES", str(PUBLISH_BYTES))

# KEYS: progress. Re-sets the hash's expiry to what is left of it: a write that changes
# nothing (the workflow lives no longer) but is replicated, so that a WAIT after it on the
# same connection proves the replicas hold everything written before, events included.
TOUCH_LUA = """
local t = redis.call('PTTL', KEYS[1])
if t > 0 then redis.call('PEXPIRE', KEYS[1], t) end
"""


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
    delta: bytes  # JSON: the fold's changes to the meta part, to merge (parts.Delta); b''


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
        a.delta,
    ]
    if a.read is not None:
        argv += a.read
    return redis_keys.workflow_keys(a.workflow_id), argv


async def eval_then_wait(
    redis: Any, script: str, keys: list[str], args: list[Any], replicas: int, timeout_ms: int
) -> tuple[Any, Any]:
    """EVAL then WAIT on one connection: the script's reply and the replicas WAIT counted
    (or its error). EVAL, not EVALSHA: after a NOSCRIPT (a new primary has no scripts)
    the WAIT sent with it would have waited its whole timeout for nothing. On Redis
    Cluster both go to the node of the workflow's keys (redis-py would send a keyless
    WAIT to every primary, and its cluster pipeline refuses scripts)."""
    if isinstance(redis, RedisCluster):
        return await _on_node(redis, script, keys, args, replicas, timeout_ms)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.eval(script, len(keys), *keys, *args)
        pipe.wait(replicas, timeout_ms)
        reply, acked = await pipe.execute(raise_on_error=False)
    if isinstance(reply, Exception):
        raise reply
    return reply, acked


async def _on_node(
    cluster: RedisCluster,
    script: str,
    keys: list[str],
    args: list[Any],
    replicas: int,
    timeout_ms: int,
) -> tuple[Any, Any]:
    for attempt in range(2):
        node = _node_of(cluster, keys[0])
        commands = [
            PipelineCommand(0, "EVAL", script, len(keys), *keys, *args),
            PipelineCommand(1, "WAIT", replicas, timeout_ms),
        ]
        try:
            await node.execute_pipeline(commands)
        except (RedisError, OSError):
            await _refresh_slots(cluster, node)  # the node may be gone (a failover)
            raise
        reply, acked = commands[0].result, commands[1].result
        if attempt == 0 and isinstance(reply, (AskError, TryAgainError, ClusterDownError)):
            await _refresh_slots(cluster, node)  # not run there: the slot moved
            continue
        if isinstance(reply, Exception):
            raise reply
        return reply, acked
    raise RedisConnectionError(f"the slot of {keys[0]} moved twice during an append")


def _node_of(cluster: RedisCluster, key: str) -> Any:
    """The primary that holds `key`; a RedisError when no node owns its slot now."""
    try:
        node = cluster.get_node_from_key(key)
    except RedisClusterException as exc:  # mid-failover
        raise RedisConnectionError(f"no Redis Cluster node owns the slot of {key}: {exc}") from exc
    if node is None:
        raise RedisConnectionError(f"no Redis Cluster node owns the slot of {key}")
    return node


async def _refresh_slots(cluster: RedisCluster, failed: Any) -> None:
    """Read the slot map again after a node failed or redirected us; quietly if none
    answers yet (the next append tries again)."""
    try:
        await cluster.nodes_manager.initialize(last_failed_node_name=failed.name)
    except (RedisError, RedisClusterException, OSError) as exc:
        logger.info("cluster slots not refreshed after %s failed: %s", failed.name, exc)


class RedisClock:
    """Deadlines for the append script in Redis's own clock.

    A command that times out here may still sit in Redis's socket buffer (a frozen Redis
    runs it when thawed): the script refuses to run past its deadline, which is `margin`
    before this client gives up, so a publish answered "timed out" is not stored later.
    The offset between the clocks is measured with TIME (error: half the round trip) and
    measured again every REFRESH seconds in the background.
    """

    REFRESH = 60.0

    def __init__(self, redis: Redis | RedisCluster) -> None:
        self.redis = redis
        # Our clients fail a command after `deadlines.seconds` (redis_client.Deadlines);
        # fakeredis cannot be frozen and the cluster client has no such deadline: none.
        deadlines = getattr(redis, "deadlines", None)
        seconds = float(getattr(deadlines, "seconds", 0.0))
        self.budget = seconds - min(1.0, seconds / 4) if 0 < seconds < float("inf") else 0.0
        self.offset: float | None = None  # Redis's clock minus ours, less the error
        self._measured = 0.0
        self._refresh: asyncio.Task[None] | None = None

    async def deadline_ms(self) -> int:
        """The Redis time (ms) after which an append sent now must not run; 0: none."""
        if not self.budget:
            return 0
        offset = self.offset
        if offset is None:
            offset = await self.measure()
        elif time.monotonic() - self._measured > self.REFRESH and self._refresh is None:
            self._refresh = asyncio.create_task(self._measure_quietly())
        return int((time.time() + offset + self.budget) * 1000)

    async def measure(self) -> float:
        """Measure the offset: Redis's clock at the midpoint of a TIME round trip."""
        before = time.time()
        seconds, micros = await self.redis.time()
        after = time.time()
        error = (after - before) / 2
        # Err early: a deadline computed with this offset is never later than meant.
        self.offset = seconds + micros / 1e6 - (before + after) / 2 - error
        self._measured = time.monotonic()
        return self.offset

    async def _measure_quietly(self) -> None:
        try:
            await self.measure()
        except (RedisError, OSError) as exc:
            logger.info("could not measure Redis's clock (%s); keeping the last offset", exc)
        finally:
            self._refresh = None
