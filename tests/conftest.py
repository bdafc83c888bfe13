"""Fixtures: a Redis client per backend (fakeredis and the real server), a live server."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import fakeredis
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis
from redis.exceptions import RedisError

from server import store
from server.app import create_app
from server.settings import Settings

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_REDIS = os.environ.get("REQUIRE_REDIS") == "1"


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


@pytest.fixture(params=["fakeredis", "redis"])
async def redis(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """Each Redis-touching test runs on the embedded default and on the real server."""
    client: Any
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis()
    else:
        client = await real_redis_or_skip()
    client.test_workflows = []
    yield client
    names = [k for wf in client.test_workflows for k in store.workflow_keys(wf)]
    if names:
        await client.delete(*names)
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
