"""Who may publish and who may read: the publish token, subscriber JWTs, the token CLI.

Which browser origins may read is CORS, in cors.py."""

from __future__ import annotations

import argparse
import hmac
import logging
import math
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jwt
from aiohttp import web

from server.models import is_workflow_id
from server.problems import Problem

logger = logging.getLogger(__name__)

ALGORITHM = "HS256"
ALL_WORKFLOWS = "*"
DEFAULT_TTL = 3600
MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash


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
    parser.add_argument(
        "workflow_ids",
        nargs="*",
        metavar="workflow_id",
        help="a workflow id the token may read; '*' grants all",
    )
    parser.add_argument(
        "--ttl",
        type=int,
        default=DEFAULT_TTL,
        metavar="SECONDS",
        help=f"lifetime in seconds (default {DEFAULT_TTL})",
    )
    parser.add_argument(
        "--definition",
        action="append",
        default=[],
        metavar="ID",
        help="a definition whose statistics it may read (repeatable)",
    )
    parser.add_argument(
        "--subscribe-secret",
        default=None,
        metavar="S",
        help="the signing secret (default: env SUBSCRIBE_SECRET)",
    )
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if not ns.workflow_ids and not ns.definition:
        print("error: name at least one workflow_id (or '*'), or a --definition", file=sys.stderr)
        return 2
    secret = ns.subscribe_secret or env.get("SUBSCRIBE_SECRET") or ""
    if not secret:
        print("error: no secret: pass --subscribe-secret or set SUBSCRIBE_SECRET", file=sys.stderr)
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
