"""The minimal single-subscription hub, as a baseline: the cost floor of our features.

One redis.asyncio PubSub per process; a channel is subscribed when its first local stream
arrives and unsubscribed after its last. Each message is encoded once (`data: ...`) and the
same bytes are appended to every local stream's list; each stream's task writes whatever
accumulated in one write. No validation, storage, replay or ids; a stream more than
MAX_PENDING frames behind is closed. POST plain-PUBLISHes.

    python -m bench.baselines.bare_hub --port 8092 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .common import REDIS_KEY, SSE_HEADERS, run, serve

MAX_PENDING = 100_000


def channel(workflow_id: str) -> str:
    return f"bench:bare:{workflow_id}"


class Sub:
    __slots__ = ("frames", "overflow", "wakeup")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.wakeup = asyncio.Event()
        self.overflow = False


class Hub:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.pubsub: Any = None
        self.subs: dict[bytes, set[Sub]] = {}
        self.ready: dict[bytes, asyncio.Event] = {}
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.pubsub = self.redis.pubsub()
        await self.pubsub.subscribe(f"bench:bare:control:{os.getpid()}")
        self.task = asyncio.create_task(self.run())

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task
        await self.pubsub.aclose()

    async def run(self) -> None:
        while True:
            msg = await self.pubsub.get_message(timeout=None)
            if msg is None:
                continue
            name = msg["channel"]
            if msg["type"] == "message":
                frame = b"data: " + msg["data"] + b"\n\n"
                for sub in self.subs.get(name, ()):
                    if len(sub.frames) >= MAX_PENDING:
                        sub.overflow = True
                    else:
                        sub.frames.append(frame)
                    sub.wakeup.set()
            elif msg["type"] == "subscribe" and name in self.ready:
                self.ready[name].set()

    async def add(self, workflow_id: str) -> Sub:
        name = channel(workflow_id).encode()
        sub = Sub()
        subs = self.subs.setdefault(name, set())
        subs.add(sub)
        if len(subs) == 1:
            self.ready[name] = asyncio.Event()
            await self.pubsub.subscribe(name)
        await asyncio.wait_for(self.ready[name].wait(), 5.0)
        return sub

    async def remove(self, workflow_id: str, sub: Sub) -> None:
        name = channel(workflow_id).encode()
        subs = self.subs.get(name)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self.subs[name]
            self.ready.pop(name, None)
            with suppress(RedisError, OSError):
                await self.pubsub.unsubscribe(name)


HUB_KEY = web.AppKey("hub", Hub)


async def stream(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB_KEY]
    wf = request.match_info["wf"]
    try:
        sub = await hub.add(wf)
    except (TimeoutError, RedisError, OSError) as exc:
        return web.Response(status=503, text=f"redis: {exc}")
    try:
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await response.prepare(request)
        await response.write(b": ok\n\n")
        while not sub.overflow:
            try:
                async with asyncio.timeout(15.0):
                    await sub.wakeup.wait()
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            sub.wakeup.clear()
            frames, sub.frames = sub.frames, []
            if frames:
                await response.write(b"".join(frames))
        return response
    except (ConnectionResetError, ConnectionError, RuntimeError):
        return web.Response(status=499)
    finally:
        await hub.remove(wf, sub)


def create_app(redis_url: str) -> web.Application:
    app = web.Application()

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        redis = Redis.from_url(redis_url)
        app[REDIS_KEY] = redis
        app[HUB_KEY] = hub = Hub(redis)
        await hub.start()
        yield
        await hub.close()
        await redis.aclose()

    app.cleanup_ctx.append(redis_ctx)
    return serve(app, stream, channel)


if __name__ == "__main__":
    run(create_app, __doc__ or "")
