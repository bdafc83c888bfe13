"""What both Python baselines share: the CLI, SSE headers, their routes (the stream is each
one's own, the POST plainly PUBLISHes) and how they run."""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable

from aiohttp import web
from redis.asyncio import Redis

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
REDIS_KEY = web.AppKey("redis", Redis)


def publish_handler(
    channel: Callable[[str], str],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """POST /workflows/{wf}/events: one event or a JSON array; each element is PUBLISHed
    as compact JSON (one pipelined round trip per POST). No validation, no storage."""

    async def publish(request: web.Request) -> web.Response:
        raw = json.loads(await request.read())
        items = raw if isinstance(raw, list) else [raw]
        name = channel(request.match_info["wf"])
        async with request.app[REDIS_KEY].pipeline(transaction=False) as pipe:
            for item in items:
                pipe.publish(name, json.dumps(item, separators=(",", ":"), ensure_ascii=False))
            await pipe.execute()
        return web.json_response({"published": len(items)}, status=201)

    return publish


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def serve(
    app: web.Application,
    stream: Callable[[web.Request], Awaitable[web.StreamResponse]],
    channel: Callable[[str], str],
) -> web.Application:
    """`app` with a baseline's routes: its `stream`, the PUBLISHing POST, /healthz."""
    app.router.add_get("/workflows/{wf}/events", stream)
    app.router.add_post("/workflows/{wf}/events", publish_handler(channel))
    app.router.add_get("/healthz", healthz)
    return app


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    return parser.parse_args()


def run(create_app: Callable[[str], web.Application], description: str) -> None:
    """The command line of a baseline: `--host`, `--port`, `--redis-url`."""
    args = parse_args(description)
    web.run_app(
        create_app(args.redis_url), host=args.host, port=args.port, print=None, shutdown_timeout=1.0
    )
