"""`python -m server`: serve (default)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from aiohttp import web

from . import auth
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
    try:
        settings = settings_mod.parse(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    auth.log_posture(settings.publish_token, settings.subscribe_secret, settings.cors_origins)
    app = create_app(settings)
    web.run_app(app, host=settings.host, port=settings.port, shutdown_timeout=4.0,
                print=lambda msg: logging.getLogger("server").info("%s", msg))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
