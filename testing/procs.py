"""Real processes for fault tests: private redis-server instances and server subprocesses.

~510 lines: single Redis, Cluster and Sentinel processes and the server subprocesses
share the port choice, the start-and-wait and the stop-by-PID that every fault test
relies on.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free port for a server a test starts (and may restart on the same port)."""
    return free_fixed_port()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_fixed_port(offsets: tuple[int, ...] = (0,)) -> int:
    """A free port (and port+offset for each offset) outside the kernel's ephemeral range.

    A server that must bind a port later, or again after a restart, cannot use an ephemeral
    port: any outgoing connection made meanwhile (the suite opens thousands) may take it, and
    the server then fails to bind ("did not start" on CI)."""
    lo, hi = _ephemeral_range()
    top = 65535 - max(offsets)
    candidates = [p for p in range(10_000, top) if all(not lo <= p + o <= hi for o in offsets)]
    for port in random.sample(candidates, min(200, len(candidates))):
        try:
            for o in offsets:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + o))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port outside the ephemeral range")


class RedisProcess:
    """A private, non-persistent redis-server on its own port; always stopped by the test."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="wfsse-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, command: list[str] | None = None) -> None:
        self.proc = subprocess.Popen(
            command
            or [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--logfile",
                self.logfile,
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.kill()
        log = Path(self.logfile)
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"redis-server on {self.port} did not start:\n{tail}")

    def start_sentinel(self, conf: Path) -> None:
        """Run as a sentinel (`redis-server <conf> --sentinel`) on this port instead."""
        self.start(["redis-server", str(conf), "--sentinel"])

    @property
    def logfile(self) -> str:
        return f"{self.dir}/redis.log"

    def sigkill(self) -> None:
        """SIGKILL it by its PID, as a crash would end it (no shutdown, no save)."""
        if self.proc is None:
            raise ValueError(f"node on {self.port} is not running")
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@asynccontextmanager
async def app_on_own_redis() -> AsyncIterator[tuple[str, str, RedisProcess, Any]]:
    """The app in this process (an aiohttp TestServer) on a redis-server of its own, which
    the test may kill and start again: (base URL, a fresh workflow id, that Redis, the
    app's client of it)."""
    from aiohttp.test_utils import TestServer
    from redis.asyncio import Redis

    from server.app import create_app
    from server.settings import Settings

    redis_proc = RedisProcess()
    redis_proc.start()
    client = Redis.from_url(redis_proc.url, socket_timeout=2, socket_connect_timeout=1)
    server = TestServer(create_app(Settings(), redis=client), host="127.0.0.1")
    await server.start_server()
    try:
        base = str(server.make_url("")).rstrip("/")
        yield base, "outage-" + uuid.uuid4().hex[:8], redis_proc, client
    finally:
        await server.close()
        await client.aclose()
        redis_proc.kill()


def server_env(**extra: str) -> dict[str, str]:
    """A child server's environment with none of the server's settings from ours (so the
    embedded Redis unless `REDIS_URL=` is given in `extra`)."""
    from server.settings import Settings

    # The test session's HISTORY_PREFIX (tests/conftest.py) stays: a child's history is
    # deleted with the session's.
    ours = {name.upper() for name in Settings.__dataclass_fields__} - {"HISTORY_PREFIX"}
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **extra}


class ServerProcess:
    """`python -m server` in a subprocess on its own port.

    `env` is added to this process's environment, or with `clean=True` to `server_env()`.
    """

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        port: int | None = None,
        clean: bool = False,
        command: list[str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.args = args
        # `python -m server` from the checkout, unless another command (an installed
        # `workflow-sse`) and folder are given.
        self.command = command or [sys.executable, "-m", "server"]
        self.cwd = cwd or ROOT
        self.env = {**(server_env() if clean else os.environ), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="wfsse-server-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 15.0) -> None:
        """Launch, then wait (bounded) for /readyz to answer 200."""
        self.launch()
        await self.wait_ready(timeout)

    def launch(self) -> None:
        self.proc = subprocess.Popen(
            [*self.command, "--port", str(self.port), *self.args],
            cwd=self.cwd,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    async def wait_ready(self, timeout: float = 15.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.output()
                try:
                    async with s.get(f"{self.url}/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError(f"server did not become ready:\n{self.output()}")

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def end(self, sig: int) -> None:
        """Deliver `sig` and wait (bounded) for the process to exit."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            self.wait(10)
        except subprocess.TimeoutExpired:
            self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")


class RestartPair:
    """A server on a fixed port that a test ends and starts again, and `other`, a second
    server on the same Redis that takes the publishes meanwhile (both `clean`)."""

    def __init__(self, env: dict[str, str], retry_ms: int) -> None:
        self.env, self.retry_ms, self.port = env, retry_ms, free_port()
        self.other = ServerProcess(env=env, clean=True)
        self.servers = [self._restartable(), self.other]

    def _restartable(self) -> ServerProcess:
        return ServerProcess(
            "--retry-ms", str(self.retry_ms), port=self.port, env=self.env, clean=True
        )

    @property
    def url(self) -> str:
        """The restartable one's (the same across restarts)."""
        return self.servers[0].url

    async def start(self) -> None:
        for srv in self.servers:
            srv.launch()
        for srv in self.servers:
            await srv.wait_ready()

    def end(self, sig: int) -> None:
        """End the restartable one with `sig`."""
        self.servers[0].end(sig)

    async def restart(self) -> None:
        """A new restartable one on the same port."""
        self.servers.append(self._restartable())
        await self.servers[-1].start()

    def stop(self) -> None:
        for srv in self.servers:
            srv.stop()


def redis_cli(node: RedisProcess, *args: str) -> str:
    """One redis-cli command against `node`, bounded in time; its output."""
    return subprocess.run(
        ["redis-cli", "-p", str(node.port), *args],
        capture_output=True,
        text=True,
        timeout=5,
    ).stdout


def replication_info(node: RedisProcess) -> dict[str, str]:
    """`INFO replication` of a live node as a dict (role, master_port, link status...)."""
    out = redis_cli(node, "info", "replication")
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)


def replica_synced(info: dict[str, str]) -> bool:
    """A replica's `INFO replication`: its link is up and no sync is in progress."""
    return info.get("master_link_status") == "up" and info.get("master_sync_in_progress") == "0"


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10,000) is free too, both outside the ephemeral
    range."""
    return free_fixed_port((0, 10_000))


class RedisClusterProcesses:
    """A private Redis Cluster on free ports (nothing on disk): `masters` masters, each with
    `replicas` replicas (none by default), so a failover can be staged by killing a master.

    `full_coverage=False` sets `cluster-require-full-coverage no`: the healthy shards keep
    answering while one is failing over (with Redis's default, yes, every node answers
    CLUSTERDOWN from the failure's detection to the promotion)."""

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 2000,
        full_coverage: bool = True,
    ) -> None:
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.full_coverage = full_coverage
        self.nodes = [RedisProcess(free_cluster_port()) for _ in range(masters * (1 + replicas))]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        for node in self.nodes:
            node.extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"{node.dir}/nodes.conf",
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                "--cluster-require-full-coverage",
                "yes" if self.full_coverage else "no",
            ]
            for attempt in range(3):  # a port taken between the check and the bind: pick again
                try:
                    node.start()
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise
                    node.port = free_cluster_port()
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *addrs,
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )
        deadline = time.monotonic() + 30
        for node in self.nodes:
            while True:
                info = self.cli(node, "cluster", "info")
                if "cluster_state:ok" in info and (self.replicas == 0 or self._synced(node)):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster not ready: {info}")
                time.sleep(0.1)

    cli = staticmethod(redis_cli)
    role = staticmethod(replication_info)

    def _synced(self, node: RedisProcess) -> bool:
        """A master sees every replica online; a replica has its link up and is synced."""
        info = self.role(node)
        if info.get("role") == "master":
            return int(info.get("connected_slaves", "0")) >= self.replicas
        return replica_synced(info)

    def master_and_replica(self) -> tuple[RedisProcess, RedisProcess]:
        """A live master and a live replica of it (the node a failover would promote)."""
        by_port = {n.port: n for n in self.nodes if n.proc is not None}
        for node in by_port.values():
            info = self.role(node)
            if info.get("role") == "slave" and info.get("master_link_status") == "up":
                master = by_port.get(int(info["master_port"]))
                if master is not None:
                    return master, node
        raise RuntimeError("no master with a live replica")

    def sigkill(self, node: RedisProcess) -> None:
        """SIGKILL one node, as a crash would end it (no shutdown, no save)."""
        node.sigkill()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


class SentinelProcesses:
    """A private primary, `replicas` replicas and `sentinels` sentinels on loopback ports
    (nothing on disk but the sentinels' config files), so a failover can be staged by
    SIGKILLing the primary. `down_after_ms` is the sentinels' down-after-milliseconds."""

    SERVICE = "wfsse"

    def __init__(
        self,
        replicas: int = 1,
        sentinels: int = 3,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 2000,
    ) -> None:
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.nodes = [RedisProcess(free_fixed_port()) for _ in range(1 + replicas)]
        self.sentinels = [RedisProcess(free_fixed_port()) for _ in range(sentinels)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.SERVICE}/0"

    def start(self) -> None:
        primary, *replicas = self.nodes
        primary.start()
        for node in replicas:
            node.extra = ["--replicaof", "127.0.0.1", str(primary.port)]
            node.start()
        for sentinel in self.sentinels:
            conf = Path(sentinel.dir) / "sentinel.conf"
            conf.write_text(
                f"port {sentinel.port}\nbind 127.0.0.1\ndir {sentinel.dir}\n"
                f"logfile {sentinel.logfile}\n"
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.SERVICE} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.SERVICE} {len(replicas)}\n"
            )
            sentinel.start_sentinel(conf)
        deadline = time.monotonic() + 30
        while not self._ready():
            if time.monotonic() > deadline:
                raise RuntimeError("sentinels did not see the primary and every replica")
            time.sleep(0.1)

    def _ready(self) -> bool:
        """Every replica is synced and every sentinel knows the replicas and its peers."""
        for node in self.nodes[1:]:
            if not replica_synced(self.role(node)):
                return False
        want = len(self.nodes) - 1
        for sentinel in self.sentinels:
            out = self.cli(sentinel, "sentinel", "master", self.SERVICE).split()
            fields = dict(zip(out[::2], out[1::2], strict=False))
            if int(fields.get("num-slaves", -1)) < want:
                return False
            if int(fields.get("num-other-sentinels", -1)) < len(self.sentinels) - 1:
                return False
        return True

    cli = staticmethod(redis_cli)
    role = staticmethod(replication_info)

    def primary_port(self) -> int | None:
        """The primary's port as the first sentinel that answers names it (None: none does)."""
        for sentinel in self.sentinels:
            if sentinel.proc is None:
                continue
            out = self.cli(sentinel, "sentinel", "get-master-addr-by-name", self.SERVICE).split()
            if len(out) == 2 and out[1].isdigit():
                return int(out[1])
        return None

    def primary(self) -> RedisProcess:
        port = self.primary_port()
        for node in self.nodes:
            if node.port == port and node.proc is not None:
                return node
        raise RuntimeError(f"the sentinels name {port}, which is not a live node")

    def sigkill(self, node: RedisProcess) -> None:
        """SIGKILL one node, as a crash would end it (no shutdown, no save)."""
        node.sigkill()

    def stop(self) -> None:
        for process in [*self.sentinels, *self.nodes]:
            process.kill()
