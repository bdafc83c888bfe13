"""The seed's design, as a baseline: one Redis pub/sub subscription per open stream.

Every GET opens its own redis.asyncio PubSub (its own Redis connection), waits for the
SUBSCRIBE confirmation, then writes each message it receives as its own SSE frame,
encoded per client, one awaited write per event. POST plain-PUBLISHes. No storage, no
replay, no validation.

    python -m bench.baselines.seed_style --port 8091 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .common import REDIS_KEY, SSE_HEADERS, run, serve


def channel(workflow_id: str) -> str:
    return f"bench:seed:{workflow_id}"


async def stream(request: web.Request) -> web.StreamResponse:
    pubsub = request.app[REDIS_KEY].pubsub()
    try:
        try:
            await pubsub.subscribe(channel(request.match_info["wf"]))
            while True:  # the confirmation: nothing published before it reaches us
                msg = await pubsub.get_message(timeout=5.0)
                if msg is not None and msg["type"] == "subscribe":
                    break
        except (RedisError, OSError) as exc:
            return web.Response(status=503, text=f"redis: {exc}")
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await response.prepare(request)
        await response.write(b": ok\n\n")
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=15.0)
            if msg is None:
                await response.write(b": keep-alive\n\n")
                continue
            data = msg["data"].decode()
            await response.write(("data: " + data + "\n\n").encode())
    except (ConnectionResetError, ConnectionError, RuntimeError, RedisError):
        return web.Response(status=499)
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


def create_app(redis_url: str) -> web.Application:
    app = web.Application()

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        # redis-py 8 caps a pool at 100 connections; the seed's design needs one per stream.
        app[REDIS_KEY] = Redis.from_url(redis_url, max_connections=2**31)
        yield
        await app[REDIS_KEY].aclose()

    app.cleanup_ctx.append(redis_ctx)
    return serve(app, stream, channel)


if __name__ == "__main__":
    run(create_app, __doc__ or "")
