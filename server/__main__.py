"""`python -m server`: serve (default)."""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Sequence

from aiohttp import web

from server import auth, connections, supervisor
from server import settings as settings_mod
from server.app import create_app


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m server` and the `workflow-sse` script."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["watch"]:
        from server.client.watch import main as watch_main

        return watch_main(argv[1:])
    if argv[:1] == ["token"]:
        from server.auth import token_main

        return token_main(argv[1:], os.environ)
    child = supervisor.CHILD_FLAG in argv
    argv = [a for a in argv if a != supervisor.CHILD_FLAG]
    try:
        settings = settings_mod.parse(argv)
        workers = supervisor.worker_count(settings.workers)
        if workers > 1 and not settings.redis_url:
            raise ValueError("WORKERS > 1 needs REDIS_URL: the embedded Redis is per process")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not child:  # once per server: by the supervisor, or by a lone process
        auth.log_posture(settings.publish_token, settings.subscribe_secret, settings.cors_origins)
    if workers > 1:
        return supervisor.supervise(argv, workers)
    # Raise the fd limit and fit MAX_STREAMS and MAX_CONNECTIONS to it, so that both caps
    # are reached before accept() runs out of descriptors.
    settings = connections.apply_fd_limit(settings)
    app = create_app(settings)
    app.on_startup.append(_tune_gc)
    # web.run_app with deadlines, connection caps, problem+json parser errors and a
    # redacting access log (see connections.py).
    connections.run(
        app,
        settings,
        shutdown_timeout=4.0,
        reuse_port=child,  # workers share the port; a lone server refuses a second one
    )
    return 0


# Measured (bench.fanout S3, 2,000 streams on 1,000 workflows): full collections of a
# server's heap took 50 to 110 ms, stalling every stream at once. The startup objects are
# frozen out of collection and full collections are ten times rarer than by default.
# Young collections stay small (Python's default 700): at 50,000 each one scanned that
# many objects for 5 to 25 ms, and S3's p99 was 3-16 ms against 3.4-4.0 ms with 700
# (three runs each, alternating).
GC_THRESHOLDS = (700, 10, 100)


async def _tune_gc(app: web.Application) -> None:
    """After startup: freeze what lives as long as the process, collect fully less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


if __name__ == "__main__":
    sys.exit(main())
