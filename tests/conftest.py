"""Fixtures: a Redis client per backend (fakeredis and the real server), a live server."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import fakeredis
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from server.app import create_app
from server.overview import runs
from server.settings import Settings
from testing.cleanup import forget
from testing.procs import RedisClusterProcesses

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_REDIS = os.environ.get("REQUIRE_REDIS") == "1"
# The session's duration history goes under its own key prefix (in-process apps through
# `serve`, child servers and benchmarks through the environment), deleted at the end. One
# per session, though pytest imports this file twice (as `conftest`, and as `tests.conftest`
# for the modules that import from it).
HISTORY_PREFIX = "wfsse-test-" + os.environ.setdefault("WFSSE_TEST_SESSION", uuid.uuid4().hex[:12])
os.environ["HISTORY_PREFIX"] = HISTORY_PREFIX
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def missing(reason: str) -> NoReturn:
    """Skip locally; under REQUIRE_REDIS=1 (CI) a missing dependency fails the test."""
    if REQUIRE_REDIS:
        pytest.fail(f"REQUIRE_REDIS=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Debian's headless Chromium under Playwright."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        missing("playwright is not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        missing(f"{CHROMIUM} is missing (apt-get install chromium fonts-noto-cjk)")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def real_redis_or_skip() -> Redis:
    """The real server; a missing one fails under REQUIRE_REDIS=1 instead of skipping."""
    client = Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        if REQUIRE_REDIS:
            pytest.fail(f"REQUIRE_REDIS=1 but Redis at {REDIS_URL} does not answer: {exc}")
        pytest.skip(f"no Redis at {REDIS_URL}")
    return client


@asynccontextmanager
async def prefixed_redis(kind: str) -> AsyncIterator[tuple[Any, str]]:
    """(client, unique key prefix) on "fakeredis" or the real server ("redis"); every key
    under the prefix is deleted afterwards."""
    client: Any = fakeredis.FakeAsyncRedis() if kind == "fakeredis" else None
    if client is None:
        client = await real_redis_or_skip()
    prefix = "test-" + uuid.uuid4().hex[:12]
    try:
        yield client, prefix
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The run index of the shared Redis forgets the runs the tests made and deleted (or
    left to expire), and the session's duration history is deleted, so a test session
    leaves no entry behind."""

    async def sweep() -> None:
        client = Redis.from_url(REDIS_URL)
        try:
            await runs.RunIndex(client, retention_seconds=1).sweep()
            names = [k async for k in client.scan_iter(match=f"{HISTORY_PREFIX}:*", count=1000)]
            for start in range(0, len(names), 500):
                await client.delete(*names[start : start + 500])
        except (RedisConnectionError, OSError):
            pass  # no real Redis in this session (any other error is a bug: it shows)
        finally:
            await client.aclose()

    asyncio.run(sweep())


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "backends(*names): Redis backends for the `redis` fixture "
        "(default fakeredis and redis; add cluster for the core stream and progress tests)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise `redis` over the backends the test's `backends` marker names."""
    if "redis" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        names = marker.args if marker else ("fakeredis", "redis")
        metafunc.parametrize("redis", names, indirect=True)


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    """A private 3-master Redis Cluster for the session, stopped at the end."""
    if shutil.which("redis-server") is None:
        if REQUIRE_REDIS:
            pytest.fail("REQUIRE_REDIS=1 but redis-server is not installed")
        pytest.skip("redis-server is not installed")
    cluster = RedisClusterProcesses()
    try:
        cluster.start()
        yield f"redis://127.0.0.1:{cluster.nodes[0].port}/0"
    finally:
        cluster.stop()


@pytest.fixture
async def redis(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """Each Redis-touching test runs on the embedded default and the real server (and a
    Redis Cluster where its module asks for it)."""
    client: Any
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis()
    elif request.param == "cluster":
        client = RedisCluster.from_url(request.getfixturevalue("cluster_url"))
        await client.initialize()
    else:
        client = await real_redis_or_skip()
    client.test_workflows = []
    yield client
    if client.test_workflows:
        await forget(client, client.test_workflows)
    await client.aclose()


@pytest.fixture
def new_workflow(redis: Any) -> Callable[[], str]:
    """Unique workflow ids, deleted from Redis after the test."""

    def make() -> str:
        wf = "t-" + uuid.uuid4().hex[:12]
        redis.test_workflows.append(wf)
        return wf

    return make


class Serve:
    """Starts the real app on a real socket over the test's Redis; returns its base URL."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.servers: list[TestServer] = []
        self.apps: list[web.Application] = []

    async def __call__(self, **overrides: Any) -> str:
        overrides.setdefault("history_prefix", HISTORY_PREFIX)
        app = create_app(Settings(**overrides), redis=self.redis)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        self.servers.append(server)
        self.apps.append(app)
        return str(server.make_url("")).rstrip("/")


@pytest.fixture
async def serve(redis: Any) -> AsyncIterator[Serve]:
    """A started app per call; all closed after the test."""
    serving = Serve(redis)
    yield serving
    for server in serving.servers:
        await server.close()
