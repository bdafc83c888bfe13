"""Typed reads of what Redis holds, for the tests' assertions.

redis-py types a reply as the union of everything any client could answer (sync or async,
bytes or str, a missing reply): XRANGE is `list[tuple[bytes | str | None, dict | None]] |
None`. The tests' clients are made without `decode_responses`, so a stream entry is a bytes
id and bytes fields, and XRANGE of a missing key is an empty list. These helpers say so once
instead of every test narrowing the union again.
"""

from __future__ import annotations

import itertools
import uuid
from typing import cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from server import redis_keys

StreamEntry = tuple[bytes, dict[bytes, bytes]]


async def stream_entries(client: Redis | RedisCluster, key: str) -> list[StreamEntry]:
    """Every entry of the stream at `key`, oldest first: (id, fields), all bytes."""
    rows = await client.xrange(key)
    # Not decoded (no decode_responses) and never None (XRANGE answers [] for a missing key):
    # the stub's union cannot know which client this is.
    return cast(list[StreamEntry], rows)


async def stream_ids(client: Redis | RedisCluster, key: str) -> list[str]:
    """The ids of every entry of the stream at `key`, oldest first."""
    return [raw_id.decode() for raw_id, _ in await stream_entries(client, key)]


def node_port(client: RedisCluster, key: str) -> int:
    """The port of the cluster node serving `key` (the client must be initialized)."""
    node = client.get_node_from_key(key)
    assert node is not None, f"no node serves {key!r}: is the client initialized?"
    return int(node.port)  # typed str | int: ClusterNode() takes either; the slots table has ints


async def owned_and_not(via_port: int, master_port: int, prefix: str) -> tuple[str, str]:
    """Two new workflow ids: one whose keys the master at `master_port` serves, and one
    that another shard serves (asked of the cluster through the node at `via_port`)."""
    client = RedisCluster.from_url(f"redis://127.0.0.1:{via_port}/0")
    await client.initialize()
    try:
        ids = (f"{prefix}-{uuid.uuid4().hex[:8]}-{i}" for i in itertools.count())
        owned = next(w for w in ids if node_port(client, redis_keys.channel(w)) == master_port)
        other = next(w for w in ids if node_port(client, redis_keys.channel(w)) != master_port)
    finally:
        await client.aclose()
    return owned, other
