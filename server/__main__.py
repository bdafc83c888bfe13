"""`python -m server`: serve (default)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from aiohttp import web

from . import auth, supervisor
from . import settings as settings_mod
from .app import create_app


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m server` and the `workflow-sse` script."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["watch"]:
        from .watch import main as watch_main

        return watch_main(argv[1:])
    if argv[:1] == ["token"]:
        from .auth import token_main

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
    if workers > 1:
        return supervisor.supervise(argv, workers)
    if not child:
        auth.log_posture(settings.publish_token, settings.subscribe_secret, settings.cors_origins)
    app = create_app(settings)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        shutdown_timeout=4.0,
        reuse_port=child,  # workers share the port; a lone server refuses a second one
        access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
        print=lambda msg: logging.getLogger("server").info("%s", msg),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
