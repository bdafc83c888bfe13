"""Who may publish and who may read: the publish token, subscriber JWTs, CORS, the token CLI."""

from __future__ import annotations

import argparse
import hmac
import logging
import math
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import jwt
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from server.models import is_workflow_id
from server.problems import Problem, problem_response

logger = logging.getLogger(__name__)

ALGORITHM = "HS256"
ALL_WORKFLOWS = "*"
DEFAULT_TTL = 3600
MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash

# CORS applies to the workflow API (streams, progress, publishing), not to ops endpoints.
CORS_SCOPE = "/workflows/"
CORS_ALLOW_METHODS = "GET, POST, OPTIONS"
CORS_ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID, If-None-Match"
CORS_EXPOSE_HEADERS = "ETag, Retry-After"
CORS_MAX_AGE = "600"


_SLUGS = {
    "missing": "missing-token",
    "expired": "expired-token",
    "forbidden": "forbidden-workflow",
    "forbidden_definition": "forbidden-definition",
}


class AuthFailed(Problem):
    """A 401 or 403; `kind` (publish|subscribe) and `reason` are bounded metric labels."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str,
        reason: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        slug = _SLUGS.get(reason, "invalid-token")
        super().__init__(status, detail, headers=headers, slug=slug)
        self.kind = kind
        self.reason = reason


def _challenge(realm: str, *, invalid: bool) -> dict[str, str]:
    # RFC 6750 3: no error code when credentials are missing, invalid_token when they fail.
    value = f'Bearer realm="{realm}"' + (', error="invalid_token"' if invalid else "")
    return {"WWW-Authenticate": value}


def _same(given: str, expected: str) -> bool:
    """Constant-time equality that also works for non-ASCII strings."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def check_publish(request_headers_authorization: str | None, publish_token: str | None) -> None:
    """Raise 401 unless publishing is open or the header carries PUBLISH_TOKEN."""
    if not publish_token:
        return
    token = bearer(request_headers_authorization)
    if token is None:
        raise AuthFailed(
            401,
            "publishing needs Authorization: Bearer <PUBLISH_TOKEN>",
            kind="publish",
            reason="missing",
            headers=_challenge("publish", invalid=False),
        )
    if not _same(token, publish_token):
        raise AuthFailed(
            401,
            "the publish token is not valid",
            kind="publish",
            reason="wrong_token",
            headers=_challenge("publish", invalid=True),
        )


def subscriber_token(request: web.Request) -> str | None:
    """The subscriber's token: Authorization Bearer, else `access_token` query, else cookie."""
    return (
        bearer(request.headers.get("Authorization"))
        or request.query.get("access_token")
        or request.cookies.get("access_token")
        or None
    )


def _unauthorized(detail: str, reason: str, *, invalid: bool = True) -> AuthFailed:
    return AuthFailed(
        401,
        detail,
        kind="subscribe",
        reason=reason,
        headers=_challenge("subscribe", invalid=invalid),
    )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _decode(token: str, secret: str) -> dict[str, Any]:
    """Verify signature and algorithm; time claims are checked by the caller against `now`."""
    options: Any = {
        "require": ["exp"],
        "verify_signature": True,
        # Checked below with an injectable clock, with PyJWT's semantics and leeway 0.
        "verify_exp": False,
        "verify_nbf": False,
        "verify_iat": False,
    }
    with warnings.catch_warnings():
        # A short secret is reported once at startup (log_posture), not on every request.
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        claims: dict[str, Any] = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options=options, leeway=0
        )
    return claims


def check_subscribe(
    token: str | None, secret: str | None, workflow_id: str, *, now: float | None = None
) -> None:
    """Raise 401 for a missing or invalid token, 403 when it does not name `workflow_id`."""
    if not secret:
        return
    workflows = _claims(token, secret, now)[0]
    if workflow_id not in workflows and ALL_WORKFLOWS not in workflows:
        raise AuthFailed(
            403,
            f"the token does not grant workflow {workflow_id!r}",
            kind="subscribe",
            reason="forbidden",
        )


def readable(
    token: str | None, secret: str | None, *, now: float | None = None
) -> list[str] | None:
    """The workflows a token may read, for lists (None: all of them); 401 like the rest."""
    if not secret:
        return None
    workflows = _claims(token, secret, now)[0]
    return None if ALL_WORKFLOWS in workflows else list(dict.fromkeys(workflows))


def check_stats(
    token: str | None, secret: str | None, definition_id: str, *, now: float | None = None
) -> None:
    """Raise 401 for a missing or invalid token, 403 unless its `workflows` hold "*" or its
    `definitions` claim lists `definition_id`."""
    if not secret:
        return
    workflows, claims = _claims(token, secret, now)
    definitions = claims.get("definitions", [])
    if not isinstance(definitions, list) or not all(isinstance(d, str) for d in definitions):
        raise _unauthorized("the 'definitions' claim must be a list of ids", "claims")
    if ALL_WORKFLOWS not in workflows and definition_id not in definitions:
        raise AuthFailed(
            403,
            f"the token does not grant the statistics of definition {definition_id!r} "
            '(it needs "*" in workflows or the definition in definitions)',
            kind="subscribe",
            reason="forbidden_definition",
        )


def _claims(token: str | None, secret: str, now: float | None) -> tuple[list[str], dict[str, Any]]:
    """The `workflows` list and all claims of a valid token, else 401."""
    if not token:
        raise _unauthorized(
            "reading needs a token (Authorization: Bearer, ?access_token= or the "
            "access_token cookie)",
            "missing",
            invalid=False,
        )
    try:
        claims = _decode(token, secret)
    except jwt.InvalidAlgorithmError:
        raise _unauthorized(f"the token must be signed with {ALGORITHM}", "algorithm") from None
    except jwt.InvalidSignatureError:
        raise _unauthorized("the token signature is not valid", "bad_signature") from None
    except jwt.MissingRequiredClaimError as exc:
        raise _unauthorized(f"the token lacks the {exc.claim!r} claim", "claims") from None
    except jwt.InvalidTokenError:
        raise _unauthorized("the token is malformed", "malformed") from None
    current = time.time() if now is None else now
    exp, nbf = claims["exp"], claims.get("nbf")
    if not _number(exp) or (nbf is not None and not _number(nbf)):
        raise _unauthorized("exp and nbf must be numeric dates", "claims")
    if exp <= current:
        raise _unauthorized("the token has expired", "expired")
    if nbf is not None and nbf > current:
        raise _unauthorized("the token is not valid yet (nbf)", "not_yet_valid")
    workflows = claims.get("workflows")
    if not isinstance(workflows, list) or not all(isinstance(w, str) for w in workflows):
        raise _unauthorized("the token needs a 'workflows' claim: a list of ids", "claims")
    return workflows, claims


def mint(
    secret: str,
    workflows: list[str],
    ttl_seconds: int,
    *,
    now: float | None = None,
    definitions: list[str] | None = None,
) -> str:
    """An HS256 token granting `workflows` (or "*"), and the statistics of `definitions`,
    for `ttl_seconds`."""
    if not secret:
        raise ValueError("a subscribe secret is needed to mint a token")
    if not workflows and not definitions:
        raise ValueError("name at least one workflow id (or '*') or definition")
    bad = [w for w in workflows if w != ALL_WORKFLOWS and not is_workflow_id(w)]
    if bad:
        raise ValueError(f"not a workflow id: {bad[0]!r}")
    if ttl_seconds <= 0:
        raise ValueError(f"ttl must be positive, got {ttl_seconds}")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "workflows": list(workflows),
        "iat": issued,
        "exp": issued + ttl_seconds,
    }
    if definitions:
        bad = [d for d in definitions if not is_workflow_id(d)]
        if bad:
            raise ValueError(f"not a definition id: {bad[0]!r}")
        claims["definitions"] = list(definitions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        return jwt.encode(claims, secret, algorithm=ALGORITHM)


def secret_warning(secret: str) -> str | None:
    """A sentence when `secret` is shorter than an HS256 key should be, else None."""
    size = len(secret.encode())
    if size < MIN_SECRET_BYTES:
        return f"SUBSCRIBE_SECRET is {size} bytes; use at least {MIN_SECRET_BYTES} random bytes"
    return None


def log_posture(
    publish_token: str | None, subscribe_secret: str | None, cors_origins: tuple[str, ...]
) -> None:
    """Say at start what is open, never what the secrets are."""
    if not publish_token:
        logger.warning("PUBLISH_TOKEN is unset: anyone who reaches the server may publish")
    if not subscribe_secret:
        logger.warning("SUBSCRIBE_SECRET is unset: anyone who reaches the server may read")
    elif (warning := secret_warning(subscribe_secret)) is not None:
        logger.warning("%s", warning)
    if cors_origins:
        logger.info("CORS allowed for %s", ", ".join(cors_origins))
    if ALL_WORKFLOWS in cors_origins:
        logger.info('CORS "*": any other origin may read, without credentials (cookies)')


def token_main(argv: list[str], env: Mapping[str, str]) -> int:
    """`python -m server token <workflow_id>... [--definition ID]... [--ttl S]
    [--subscribe-secret S]`."""
    parser = argparse.ArgumentParser(
        prog="python -m server token",
        description="Print a subscriber token (JWT, HS256) for the given workflow ids "
        "(and definitions, for their statistics).",
    )
    parser.add_argument("workflow_ids", nargs="*", metavar="workflow_id",
                        help="a workflow id the token may read; '*' grants all")  # fmt: skip
    parser.add_argument("--ttl", type=int, default=DEFAULT_TTL, metavar="SECONDS",
                        help=f"lifetime in seconds (default {DEFAULT_TTL})")  # fmt: skip
    parser.add_argument("--definition", action="append", default=[], metavar="ID",
                        help="a definition whose statistics it may read (repeatable)")  # fmt: skip
    parser.add_argument("--subscribe-secret", default=None, metavar="S",
                        help="the signing secret (default: env SUBSCRIBE_SECRET)")  # fmt: skip
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if not ns.workflow_ids and not ns.definition:
        print("error: name at least one workflow_id (or '*'), or a --definition",
              file=sys.stderr)  # fmt: skip
        return 2
    secret = ns.subscribe_secret or env.get("SUBSCRIBE_SECRET") or ""
    if not secret:
        print("error: no secret: pass --subscribe-secret or set SUBSCRIBE_SECRET",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        token = mint(secret, ns.workflow_ids, ns.ttl, definitions=ns.definition)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if (warning := secret_warning(secret)) is not None:
        print(f"warning: {warning}", file=sys.stderr)
    print(token)
    return 0


# CORS ------------------------------------------------------------------------------------

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
