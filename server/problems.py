"""Errors as RFC 9457 problem+json, translated in one middleware."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from redis.exceptions import RedisError

from server import app_keys, connections
from server.fanout.hub import HubUnavailable
from server.models import EventRejected
from server.store import AppendConflict, AppendExpired, AppendNotReplicated, AppendUnknown
from server.streams.registry import StreamsFull
from server.throttle import Throttle

if TYPE_CHECKING:
    from server import wire

logger = logging.getLogger(__name__)
_throttle = Throttle(logger)

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


@dataclass(frozen=True)
class Rule:
    """How one exception type is answered: its status, problem `type` slug and detail.

    `detail` is a format string over the exception (`{exc}`) and the app's settings
    (`{settings}`); `log`, when set, is a WARNING line over the request (`{request}`) and
    the exception.
    """

    status: int
    detail: str
    slug: str | None = None  # None: from the status's title
    retry_after: str | None = None
    log: str | None = None


_REDIS_DOWN = Rule(
    503,
    "Redis is unavailable; try again shortly",
    retry_after="1",
    log="Redis unavailable for {request.method} {request.path}: {exc}",
)
_NOT_STORED = Rule(
    503,
    "nothing was stored ({exc}); try again",
    retry_after="1",
    log="append not stored for {request.path}: {exc}",
)

# Exception type -> its answer, looked up along the exception's MRO (the most specific type
# wins). None: not an error to answer; aiohttp drops the connection of a client that left.
# Besides these, a Problem (AuthFailed too) is its own answer, and an HTTPException from
# aiohttp (404, 405...) keeps its status, reason and Allow/Retry-After headers.
RULES: dict[type[BaseException], Rule | None] = {
    EventRejected: Rule(422, "{exc.detail}", slug="invalid-event"),
    StreamsFull: Rule(503, "{exc}", slug="too-many-streams", retry_after="5"),
    web.HTTPRequestEntityTooLarge: Rule(
        413, "request body over MAX_BODY_BYTES ({settings.max_body_bytes} bytes)"
    ),
    AppendNotReplicated: Rule(
        503,
        "The events are {exc}, so a failover could still lose them. Retry with the same "
        "idempotency_key on each event: nothing is stored twice, and the retry is "
        "answered 201 once enough replicas hold them.",
        slug="outcome-unknown",
        retry_after="1",
        log="append not replicated for {request.path}: {exc}",
    ),
    AppendUnknown: Rule(
        503,
        "Redis did not confirm the write in time: the events were probably not stored, "
        "but may have been. Retry with the same idempotency_key on each event and "
        "nothing is stored twice.",
        slug="outcome-unknown",
        retry_after="1",
        log="append outcome unknown for {request.path}: {exc}",
    ),
    AppendExpired: _NOT_STORED,
    AppendConflict: _NOT_STORED,
    RedisError: _REDIS_DOWN,
    OSError: _REDIS_DOWN,
    HubUnavailable: _REDIS_DOWN,  # no cluster node owns the workflow's slot right now
    ConnectionResetError: None,
}


def rule_of(exc: BaseException) -> Rule | None:
    """The rule of `exc`'s most specific type in RULES, if any."""
    for cls in type(exc).__mro__:
        if cls in RULES:
            return RULES[cls]
    return None


def problem_of(request: web.Request, exc: Exception) -> Problem | None:
    """The Problem `exc` is answered with, or None if it is not one to answer."""
    if isinstance(exc, Problem):
        return exc
    rule = rule_of(exc)
    if rule is None:
        if not isinstance(exc, web.HTTPException) or exc.status < 400:
            return None
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        detail = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        return Problem(exc.status, detail, headers=headers)
    if rule.log is not None:
        logger.warning(rule.log.format(request=request, exc=exc))
    return Problem(
        rule.status,
        rule.detail.format(exc=exc, settings=request.app[app_keys.settings_key]),
        errors=exc.errors if isinstance(exc, EventRejected) else None,
        headers=None if rule.retry_after is None else {"Retry-After": rule.retry_after},
        slug=rule.slug,
    )


def _stream_failed(
    request: web.Request, response: web.StreamResponse, exc: Exception
) -> web.StreamResponse:
    """After the headers no other answer can be sent: log once, close the connection.

    The started response goes back to aiohttp, which finds the connection closing, writes
    nothing more and logs the request as it was answered. Once per kind of failure per
    LOG_INTERVAL: a fault that ends every open stream at once is one line, not thousands.
    """
    if isinstance(exc, ConnectionError):
        pass  # the client left
    elif isinstance(exc, Problem | web.HTTPException) or rule_of(exc) is not None:
        _throttle(
            logging.WARNING,
            f"after:{type(exc).__name__}",
            "%s %s failed after its response started (%s: %s); connection closed",
            request.method,
            request.path,
            type(exc).__name__,
            exc,
        )
    else:
        _throttle(
            logging.ERROR,
            f"after:{type(exc).__name__}",
            "%s %s failed after its response started; connection closed",
            request.method,
            request.path,
            exc_info=exc,
        )
    if request.transport is not None:
        request.transport.close()  # what was written is still sent, then the connection ends
    return response


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Translate every known failure into problem+json; never leak a traceback."""
    try:
        return await handler(request)
    except Exception as exc:
        started = connections.started(request)
        if started is not None:
            return _stream_failed(request, started, exc)
        problem = problem_of(request, exc)
        if problem is None:
            raise
        return problem_response(
            problem.status,
            problem.detail,
            errors=problem.errors,
            headers=problem.headers,
            slug=problem.slug,
        )
