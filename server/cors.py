"""CORS_ORIGINS: which browser origins may read streams and progress (and publish).

Preflights on /workflows/... are answered by a middleware; the headers of every in-scope
response (streams included) are added by an on_response_prepare hook, so they are on a
StreamResponse and on a problem+json error alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from server.auth import ALL_WORKFLOWS
from server.problems import problem_response

# CORS applies to the workflow API (streams, progress, publishing), not to ops endpoints.
CORS_SCOPE = "/workflows/"
CORS_ALLOW_METHODS = "GET, POST, OPTIONS"
CORS_ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID, If-None-Match"
CORS_EXPOSE_HEADERS = "ETag, Retry-After"
CORS_MAX_AGE = "600"

PrepareHook = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


def origin_allowed(origin: str | None, origins: tuple[str, ...]) -> bool:
    """True when `origin` is listed, or "*" is (the opaque origin "null" only when listed)."""
    if not origin:
        return False
    return origin in origins or (ALL_WORKFLOWS in origins and origin != "null")


def _in_scope(request: web.Request) -> bool:
    return request.path.startswith(CORS_SCOPE)


def _add_vary_origin(response: web.StreamResponse) -> None:
    vary = response.headers.get("Vary", "")
    names = {part.strip().lower() for part in vary.split(",")}
    if "origin" not in names and "*" not in names:
        response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"


def cors_on_prepare(origins: tuple[str, ...]) -> PrepareHook:
    """An `on_response_prepare` hook: CORS headers on every in-scope response, streams too.

    It runs inside `prepare()`, before the headers go out, so a StreamResponse gets
    them as well as a plain Response or a problem+json error (which a page can then read).
    """

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        if not origins or not _in_scope(request):
            return
        _add_vary_origin(response)  # caches must not hand one origin's answer to another
        origin = request.headers.get("Origin")
        if origin is None or not origin_allowed(origin, origins):
            return
        if origin in origins:
            # A listed origin is trusted with credentials (the access_token cookie), and
            # credentials need the origin echoed: browsers refuse them with "*".
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
        else:
            # Allowed only through "*": any site may read, none with the user's cookies
            # (the Fetch standard's answer for a wildcard; a token in a header still works).
            response.headers["Access-Control-Allow-Origin"] = "*"
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS

    return on_prepare


def cors_middleware(origins: tuple[str, ...]) -> Middleware:
    """Answer CORS preflights on /workflows/...: 204 for a listed origin, else 403 problem."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        is_preflight = (
            request.method == "OPTIONS"
            and _in_scope(request)
            and "Access-Control-Request-Method" in request.headers
        )
        if not is_preflight:
            return await handler(request)
        origin = request.headers.get("Origin")
        if not origin_allowed(origin, origins):
            # Returned, not raised, so it holds wherever this sits among the middlewares.
            return problem_response(
                403, f"origin {origin!r} is not in CORS_ORIGINS", slug="cors-origin-denied"
            )
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": CORS_ALLOW_METHODS,
                "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
                "Access-Control-Max-Age": CORS_MAX_AGE,
            },
        )

    return middleware


def setup_cors(app: web.Application, origins: tuple[str, ...]) -> None:
    """Install the preflight middleware and the header hook on `app` (before it starts)."""
    app.middlewares.append(cors_middleware(origins))
    app.on_response_prepare.append(cors_on_prepare(origins))
