"""MIN_REPLICAS_ACK on Redis Cluster: acknowledged events survive a master's SIGKILL.

The publisher-side twin of tests/test_sentinel.py: a private 3 masters + 3 replicas
cluster, a real server with `MIN_REPLICAS_ACK=1`, an engine publishing with idempotency
keys and retries. Replication of the victim's shard is cut just before the kill (its
replica SIGSTOPped, the link closed on the master), so the events then in flight reach
no replica; the killed master is started again afterwards and rejoins as the promoted
node's replica, which is what lets WAIT succeed on that shard again.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import aiohttp
from redis.asyncio.cluster import RedisCluster

from server import redis_keys
from testing.procs import RedisClusterProcesses, ServerProcess, server_env
from testing.redis_reads import owned_and_not, stream_entries
from testing.waiting import wait_until
from tests.test_sentinel import Engine

RECOVERY_SECONDS = 15.0  # the promotion, then the old master back and synced as a replica


async def test_with_min_replicas_ack_a_cluster_master_killed_loses_no_acknowledged_event() -> None:
    cluster = RedisClusterProcesses(
        masters=3, replicas=1, node_timeout_ms=1000, full_coverage=False
    )
    server: ServerProcess | None = None
    try:
        cluster.start()
        master, replica = cluster.master_and_replica()
        wf, _ = await owned_and_not(replica.port, master.port, "durable")

        server = ServerProcess(env=server_env(REDIS_URL=cluster.url, MIN_REPLICAS_ACK="1"))
        await server.start()
        timeout = aiohttp.ClientTimeout(total=90, sock_read=20)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            engine = Engine(server.url, wf, "c")
            publishing = asyncio.create_task(engine.run(session))
            try:
                await wait_until(lambda: len(engine.acked) >= 20, 15, "publishing")
                assert replica.proc is not None
                os.kill(replica.proc.pid, signal.SIGSTOP)
                try:
                    cluster.cli(master, "client", "kill", "type", "replica")
                    cut = time.monotonic()
                    # An append is now waiting for a replica that will never have it.
                    await asyncio.sleep(0.3)
                    killed = time.monotonic()
                    cluster.sigkill(master)
                finally:
                    os.kill(replica.proc.pid, signal.SIGCONT)
                promoted = await wait_until(
                    lambda: cluster.role(replica).get("role") == "master", 30, "replica promoted"
                )
                master.start()  # same port and nodes.conf: it rejoins as the new replica
                back = await wait_until(
                    lambda: engine.first_success_after(promoted),
                    RECOVERY_SECONDS,
                    "publishing after the promotion",
                )
                await wait_until(
                    lambda: any(at > back + 0.5 for at in engine.acked_at.values()),
                    RECOVERY_SECONDS,
                    "more events",
                )
                engine.stop.set()
                await asyncio.wait_for(publishing, 35)
            finally:
                publishing.cancel()
                await asyncio.gather(publishing, return_exceptions=True)

        redis = RedisCluster.from_url(f"redis://127.0.0.1:{replica.port}/0")
        try:
            rows = await stream_entries(redis, redis_keys.stream_key(wf))
        finally:
            await redis.aclose()
        stored = {i.decode(): json.loads(f[b"d"]).get("message") for i, f in rows}
        messages = list(stored.values())
        assert len(messages) == len(set(messages)), "an event stored twice"
        for key, event_id in engine.acked.items():
            assert stored.get(event_id) == key, f"{key} answered 201 as {event_id}, not stored"
        refused = [s for at, s in engine.answers if at > cut and s != 201]
        print(
            f"promotion {promoted - killed:.1f} s after the kill; publishing back "
            f"{back - promoted:.1f} s after it (the old master restarted as its replica); "
            f"{len(engine.acked)} acknowledged, all stored once; {len(refused)} refusals "
            "from the cut on"
        )
    finally:
        if server is not None:
            server.stop()
        cluster.stop()
