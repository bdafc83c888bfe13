"""Errors as RFC 9457 problem+json, translated in one middleware."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from aiohttp import web
from redis.exceptions import RedisError

from server import app_keys
from server.fanout.hub import HubUnavailable
from server.store import AppendConflict, AppendExpired, AppendNotReplicated, AppendUnknown

if TYPE_CHECKING:
    from server import wire

logger = logging.getLogger(__name__)

PROBLEM_TYPE = "application/problem+json"

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Problem(Exception):
    """An error with an HTTP status, answered as problem+json."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        errors: list[wire.ProblemError] | None = None,
        headers: Mapping[str, str] | None = None,
        slug: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors
        self.headers = dict(headers or {})
        self.slug = slug


def problem_response(
    status: int,
    detail: str,
    *,
    errors: list[wire.ProblemError] | None = None,
    headers: Mapping[str, str] | None = None,
    slug: str | None = None,
) -> web.Response:
    """Build the problem+json response for `status`."""
    title = _TITLES.get(status, "Error")
    body: wire.Problem = {
        "type": f"/problems/{slug or title.lower().replace(' ', '-')}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    return web.Response(
        status=status,
        body=json.dumps(body, ensure_ascii=False).encode(),
        content_type=PROBLEM_TYPE,
        charset="utf-8",
        headers=headers,
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Translate every known failure into problem+json; never leak a traceback."""
    try:
        return await handler(request)
    except Problem as exc:
        return problem_response(
            exc.status, exc.detail, errors=exc.errors, headers=exc.headers, slug=exc.slug
        )
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[app_keys.settings_key].max_body_bytes
        return problem_response(
            413,
            f"request body over MAX_BODY_BYTES ({limit} bytes)",
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        detail = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        return problem_response(exc.status, detail, headers=headers)
    except AppendNotReplicated as exc:
        logger.warning("append not replicated for %s: %s", request.path, exc)
        return problem_response(
            503,
            f"The events are {exc}, so a failover could still lose them. Retry with the same "
            "idempotency_key on each event: nothing is stored twice, and the retry is "
            "answered 201 once enough replicas hold them.",
            headers={"Retry-After": "1"},
            slug="outcome-unknown",
        )
    except AppendUnknown as exc:
        logger.warning("append outcome unknown for %s: %s", request.path, exc)
        return problem_response(
            503,
            "Redis did not confirm the write in time: the events were probably not stored, "
            "but may have been. Retry with the same idempotency_key on each event and "
            "nothing is stored twice.",
            headers={"Retry-After": "1"},
            slug="outcome-unknown",
        )
    except (AppendExpired, AppendConflict) as exc:
        logger.warning("append not stored for %s: %s", request.path, exc)
        return problem_response(
            503, f"nothing was stored ({exc}); try again", headers={"Retry-After": "1"}
        )
    except (RedisError, OSError, HubUnavailable) as exc:
        if isinstance(exc, ConnectionResetError):
            raise
        logger.warning("Redis unavailable for %s %s: %s", request.method, request.path, exc)
        return problem_response(
            503, "Redis is unavailable; try again shortly", headers={"Retry-After": "1"}
        )
