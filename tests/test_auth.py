"""Auth: the publish token, subscriber JWTs, token sources, the token CLI, and CORS on the wire."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request

from server import auth, cors
from server.problems import Problem, problem_middleware
from testing import tokens
from testing.tokens import b64, unsigned

SECRET = "s3cret-" + "x" * 40
NOW = 1_769_077_817.0
LATER = NOW + 600
WF = "wf-1"


forge = functools.partial(tokens.forge, key=SECRET)


def foreign(alg: str, claims: dict[str, Any]) -> str:
    """A token naming another algorithm; the algorithm check comes before any signature check."""
    return f"{b64({'alg': alg, 'typ': 'JWT'})}.{b64(claims)}.c2lnbmF0dXJl"


def tampered(claims: dict[str, Any]) -> str:
    """A genuine header and signature around a payload the attacker rewrote."""
    header, _, signature = forge(GOOD).split(".")
    return f"{header}.{b64(claims)}.{signature}"


GOOD = {"workflows": [WF], "exp": LATER}


def outcome(token: str | None, workflow_id: str = WF) -> tuple[int, str] | None:
    """None when allowed, else (status, metric reason)."""
    try:
        auth.check_subscribe(token, SECRET, workflow_id, now=NOW)
    except auth.AuthFailed as exc:
        return exc.status, exc.reason
    return None


@pytest.mark.parametrize(
    ("name", "token", "expected"),
    [
        ("valid", forge(GOOD), None),
        ("star grants all", forge({"workflows": ["*"], "exp": LATER}), None),
        ("one of several", forge({"workflows": ["a", WF, "b"], "exp": LATER}), None),
        ("extra claims ignored", forge({**GOOD, "sub": "alice", "iat": int(NOW)}), None),
        ("no token", None, (401, "missing")),
        ("empty token", "", (401, "missing")),
        ("not a jwt", "garbage", (401, "malformed")),
        ("bad signature", forge(GOOD, key="another-secret-" + "y" * 40), (401, "bad_signature")),
        ("tampered payload", tampered({"workflows": ["*"], "exp": LATER}), (401, "bad_signature")),
        ("alg none", unsigned(GOOD), (401, "algorithm")),
        ("alg none signed with the secret", forge(GOOD, key=None, alg="none"), (401, "algorithm")),
        ("HS512", forge(GOOD, key=SECRET * 2, alg="HS512"), (401, "algorithm")),
        ("RS256", foreign("RS256", GOOD), (401, "algorithm")),
        ("ES256", foreign("ES256", GOOD), (401, "algorithm")),
        ("lower-case hs256", foreign("hs256", GOOD), (401, "algorithm")),
        ("missing exp", forge({"workflows": [WF]}), (401, "claims")),
        ("null exp", forge({"workflows": [WF], "exp": None}), (401, "claims")),
        ("string exp", forge({"workflows": [WF], "exp": str(int(LATER))}), (401, "claims")),
        ("boolean exp", forge({"workflows": [WF], "exp": True}), (401, "claims")),
        ("expired", forge({"workflows": [WF], "exp": NOW - 1}), (401, "expired")),
        ("expires this second", forge({"workflows": [WF], "exp": NOW}), (401, "expired")),
        ("not valid yet", forge({**GOOD, "nbf": NOW + 60}), (401, "not_yet_valid")),
        ("missing workflows", forge({"exp": LATER}), (401, "claims")),
        ("workflows a string", forge({"workflows": WF, "exp": LATER}), (401, "claims")),
        ("workflows with a number", forge({"workflows": [WF, 7], "exp": LATER}), (401, "claims")),
        ("workflows an object", forge({"workflows": {WF: True}, "exp": LATER}), (401, "claims")),
        ("other workflow", forge({"workflows": ["wf-2"], "exp": LATER}), (403, "forbidden")),
        ("empty list", forge({"workflows": [], "exp": LATER}), (403, "forbidden")),
        ("prefix is not a match", forge({"workflows": ["wf-"], "exp": LATER}), (403, "forbidden")),
        ("glob is not a pattern", forge({"workflows": ["wf-*"], "exp": LATER}), (403, "forbidden")),
    ],
)
def test_subscribe_token_cases(
    name: str, token: str | None, expected: tuple[int, str] | None
) -> None:
    assert outcome(token) == expected, name


def test_subscribe_is_open_without_a_secret() -> None:
    auth.check_subscribe(None, None, WF)
    auth.check_subscribe("garbage", "", WF)


def test_subscribe_uses_the_real_clock_by_default() -> None:
    auth.check_subscribe(auth.mint(SECRET, [WF], 60), SECRET, WF)
    with pytest.raises(auth.AuthFailed) as info:
        auth.check_subscribe(forge({"workflows": [WF], "exp": 1}), SECRET, WF)
    assert info.value.reason == "expired"


def test_subscribe_failures_are_problems_with_a_bearer_challenge() -> None:
    with pytest.raises(Problem) as missing:
        auth.check_subscribe(None, SECRET, WF, now=NOW)
    assert missing.value.status == 401
    assert missing.value.headers == {"WWW-Authenticate": 'Bearer realm="subscribe"'}
    assert missing.value.slug == "missing-token"
    with pytest.raises(Problem) as expired:
        auth.check_subscribe(forge({"workflows": [WF], "exp": 1}), SECRET, WF, now=NOW)
    assert expired.value.headers == {
        "WWW-Authenticate": 'Bearer realm="subscribe", error="invalid_token"'
    }
    assert expired.value.slug == "expired-token"
    with pytest.raises(Problem) as forbidden:
        auth.check_subscribe(forge(GOOD), SECRET, "wf-2", now=NOW)
    assert (forbidden.value.status, forbidden.value.slug) == (403, "forbidden-workflow")
    assert "wf-2" in forbidden.value.detail


def test_problem_detail_never_contains_the_token() -> None:
    token = forge({"workflows": ["wf-2"], "exp": LATER})
    for candidate in (token, token + "x", forge({"workflows": [WF], "exp": 1})):
        try:
            auth.check_subscribe(candidate, SECRET, "wf-9", now=NOW)
        except auth.AuthFailed as exc:
            assert candidate not in exc.detail
            assert candidate not in str(exc.headers)


def test_short_secret_does_not_warn_per_request() -> None:
    short = "short"
    token = auth.mint(short, [WF], 60, now=NOW)  # filterwarnings=error would fail here
    auth.check_subscribe(token, short, WF, now=NOW)
    assert auth.secret_warning(short) is not None
    assert auth.secret_warning(SECRET) is None


# mint --------------------------------------------------------------------------------------


def test_mint_round_trip() -> None:
    token = auth.mint(SECRET, [WF, "wf-2"], 120, now=NOW)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims == {"workflows": [WF, "wf-2"], "iat": int(NOW), "exp": int(NOW) + 120}
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    assert outcome(token) is None
    assert outcome(token, "wf-2") is None
    assert outcome(token, "wf-3") == (403, "forbidden")
    with pytest.raises(auth.AuthFailed):
        auth.check_subscribe(token, SECRET, WF, now=NOW + 120)


@pytest.mark.parametrize(
    ("secret", "workflows", "ttl"),
    [
        ("", [WF], 60),
        (SECRET, [], 60),
        (SECRET, ["a:b"], 60),
        (SECRET, [WF], 0),
        (SECRET, [WF], -5),
    ],
)
def test_mint_refuses_misuse(secret: str, workflows: list[str], ttl: int) -> None:
    with pytest.raises(ValueError):
        auth.mint(secret, workflows, ttl)


# publish -----------------------------------------------------------------------------------

PUBLISH = "pub-token-" + "z" * 20
CHALLENGE = 'Bearer realm="publish"'


@pytest.mark.parametrize(
    ("header", "token", "expected"),
    [
        (None, None, None),
        ("Bearer anything", None, None),
        ("Bearer anything", "", None),
        (f"Bearer {PUBLISH}", PUBLISH, None),
        (f"bearer {PUBLISH}", PUBLISH, None),
        (f"  Bearer   {PUBLISH}  ", PUBLISH, None),
        (None, PUBLISH, ("missing", CHALLENGE)),
        ("", PUBLISH, ("missing", CHALLENGE)),
        ("Bearer", PUBLISH, ("missing", CHALLENGE)),
        (f"Basic {PUBLISH}", PUBLISH, ("missing", CHALLENGE)),
        (PUBLISH, PUBLISH, ("missing", CHALLENGE)),
        ("Bearer wrong", PUBLISH, ("wrong_token", CHALLENGE + ', error="invalid_token"')),
        (f"Bearer {PUBLISH}x", PUBLISH, ("wrong_token", CHALLENGE + ', error="invalid_token"')),
        (f"Bearer {PUBLISH[:-1]}", PUBLISH, ("wrong_token", CHALLENGE + ', error="invalid_token"')),
        ("Bearer 품질", PUBLISH, ("wrong_token", CHALLENGE + ', error="invalid_token"')),
    ],
)
def test_publish_token_cases(
    header: str | None, token: str | None, expected: tuple[str, str] | None
) -> None:
    try:
        auth.check_publish(header, token)
    except auth.AuthFailed as exc:
        assert exc.status == 401
        assert exc.kind == "publish"
        assert (exc.reason, exc.headers["WWW-Authenticate"]) == expected
        assert PUBLISH not in exc.detail
    else:
        assert expected is None


def test_non_ascii_publish_token_compares_without_error() -> None:
    auth.check_publish("Bearer 비밀", "비밀")
    with pytest.raises(auth.AuthFailed):
        auth.check_publish("Bearer 비밀x", "비밀")


# token sources -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers", "expected"),
    [
        ("/x", {}, None),
        ("/x", {"Authorization": "Bearer h"}, "h"),
        ("/x?access_token=q", {}, "q"),
        ("/x", {"Cookie": "access_token=c"}, "c"),
        ("/x?access_token=q", {"Authorization": "Bearer h", "Cookie": "access_token=c"}, "h"),
        ("/x?access_token=q", {"Cookie": "access_token=c"}, "q"),
        ("/x?access_token=", {"Cookie": "access_token=c"}, "c"),
        ("/x", {"Authorization": "Basic h", "Cookie": "access_token=c"}, "c"),
        ("/x", {"Cookie": "other=1; access_token=c2"}, "c2"),
    ],
)
def test_subscriber_token_sources_in_order(
    path: str, headers: dict[str, str], expected: str | None
) -> None:
    assert auth.subscriber_token(make_mocked_request("GET", path, headers=headers)) == expected


# token CLI ---------------------------------------------------------------------------------


def test_token_main_prints_only_the_token(capsys: pytest.CaptureFixture[str]) -> None:
    assert auth.token_main([WF, "wf-2", "--ttl", "90"], {"SUBSCRIBE_SECRET": SECRET}) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert out == token + "\n" and err == ""
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["workflows"] == [WF, "wf-2"]
    assert claims["exp"] - claims["iat"] == 90
    auth.check_subscribe(token, SECRET, "wf-2")


def test_token_main_flag_wins_over_environment(capsys: pytest.CaptureFixture[str]) -> None:
    flag = "flag-secret-" + "f" * 30
    assert auth.token_main(["*", "--subscribe-secret", flag], {"SUBSCRIBE_SECRET": SECRET}) == 0
    token = capsys.readouterr().out.strip()
    auth.check_subscribe(token, flag, "anything")
    assert outcome(token) == (401, "bad_signature")


def test_token_main_default_ttl_is_an_hour(capsys: pytest.CaptureFixture[str]) -> None:
    assert auth.token_main([WF], {"SUBSCRIBE_SECRET": SECRET}) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 3600


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([WF], {}, "SUBSCRIBE_SECRET"),
        ([WF], {"SUBSCRIBE_SECRET": ""}, "SUBSCRIBE_SECRET"),
        (["bad id"], {"SUBSCRIBE_SECRET": SECRET}, "not a workflow id"),
        ([WF, "--ttl", "0"], {"SUBSCRIBE_SECRET": SECRET}, "ttl must be positive"),
        ([WF, "--ttl", "soon"], {"SUBSCRIBE_SECRET": SECRET}, "invalid int"),
        ([], {"SUBSCRIBE_SECRET": SECRET}, "workflow_id"),
    ],
)
def test_token_main_errors_exit_2(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert auth.token_main(argv, env) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err


def test_token_main_warns_about_a_short_secret(capsys: pytest.CaptureFixture[str]) -> None:
    assert auth.token_main([WF], {"SUBSCRIBE_SECRET": "tiny-k3y"}) == 0
    out, err = capsys.readouterr()
    assert out.count(".") == 2
    assert "at least 32" in err
    assert "tiny-k3y" not in err


# CORS over a real socket -------------------------------------------------------------------

ORIGIN = "https://dash.example"
CORS_KEYS = {
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Credentials",
    "Access-Control-Expose-Headers",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Max-Age",
}


async def stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await response.prepare(request)  # headers leave here, before the handler returns
    await response.write(b"retry: 3000\n\n")
    await response.write_eof()
    return response


async def progress(request: web.Request) -> web.Response:
    if request.query.get("deny"):
        raise Problem(401, "no token", headers={"WWW-Authenticate": 'Bearer realm="subscribe"'})
    return web.json_response({"ok": True}, headers={"ETag": '"1-0"', "Vary": "Accept"})


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def cors_app() -> Callable[[tuple[str, ...]], web.Application]:
    def make(origins: tuple[str, ...]) -> web.Application:
        app = web.Application(middlewares=[problem_middleware])
        cors.setup_cors(app, origins)
        app.router.add_get("/workflows/{workflow_id}/events", stream)
        app.router.add_post("/workflows/{workflow_id}/events", ok)
        app.router.add_get("/workflows/{workflow_id}/progress", progress)
        app.router.add_get("/healthz", ok)
        return app

    return make


@pytest.fixture
async def client(
    aiohttp_client: ClientFactory, cors_app: Callable[[tuple[str, ...]], web.Application]
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    yield await aiohttp_client(cors_app((ORIGIN, "http://localhost:5173")))


async def test_stream_response_carries_cors_headers(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/workflows/wf-1/events", headers={"Origin": ORIGIN})
    assert resp.status == 200
    assert await resp.read() == b"retry: 3000\n\n"
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    assert resp.headers["Access-Control-Expose-Headers"] == "ETag, Retry-After"
    assert resp.headers["Vary"] == "Origin"
    assert "Access-Control-Allow-Methods" not in resp.headers


async def test_json_and_error_responses_carry_cors_headers(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/workflows/wf-1/progress", headers={"Origin": ORIGIN})
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert resp.headers["Vary"] == "Accept, Origin"
    denied = await client.get("/workflows/wf-1/progress?deny=1", headers={"Origin": ORIGIN})
    assert denied.status == 401
    assert denied.content_type == "application/problem+json"
    assert denied.headers["Access-Control-Allow-Origin"] == ORIGIN  # the page can read why


async def test_preflight_from_a_listed_origin(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.options(
        "/workflows/wf-1/events",
        headers={
            "Origin": "http://localhost:5173",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, last-event-id",
        },
    )
    assert resp.status == 204
    assert await resp.read() == b""
    assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    assert resp.headers["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"
    assert resp.headers["Access-Control-Allow-Headers"] == (
        "Authorization, Content-Type, Last-Event-ID, If-None-Match"
    )
    assert resp.headers["Access-Control-Max-Age"] == "600"
    assert resp.headers["Vary"] == "Origin"


async def test_preflight_from_an_unlisted_origin_is_a_403_problem(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.options(
        "/workflows/wf-1/progress",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert resp.status == 403
    assert resp.content_type == "application/problem+json"
    body = await resp.json(content_type=None)
    assert body["type"] == "/problems/cors-origin-denied"
    assert not CORS_KEYS & set(resp.headers)


async def test_unlisted_origin_gets_no_cors_headers(
    client: TestClient[web.Request, web.Application],
) -> None:
    for origin in ("https://evil.example", "null", "https://dash.example.evil"):
        resp = await client.get("/workflows/wf-1/events", headers={"Origin": origin})
        assert resp.status == 200
        assert not CORS_KEYS & set(resp.headers)
        assert resp.headers["Vary"] == "Origin"


async def test_no_origin_and_out_of_scope_paths_get_no_cors_headers(
    client: TestClient[web.Request, web.Application],
) -> None:
    plain = await client.get("/workflows/wf-1/events")
    assert not CORS_KEYS & set(plain.headers)
    health = await client.get("/healthz", headers={"Origin": ORIGIN})
    assert not CORS_KEYS & set(health.headers)
    assert "Vary" not in health.headers
    preflight = await client.options(
        "/healthz", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}
    )
    assert preflight.status == 405


async def test_options_without_preflight_header_is_not_a_preflight(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.options("/workflows/wf-1/events", headers={"Origin": ORIGIN})
    assert resp.status == 405
    assert resp.content_type == "application/problem+json"


async def test_star_allows_any_origin_without_credentials_but_not_null(
    aiohttp_client: ClientFactory, cors_app: Callable[[tuple[str, ...]], web.Application]
) -> None:
    client = await aiohttp_client(cors_app(("*",)))
    resp = await client.get("/workflows/wf-1/events", headers={"Origin": "https://any.example"})
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in resp.headers
    assert resp.headers["Vary"] == "Origin"
    opaque = await client.get("/workflows/wf-1/events", headers={"Origin": "null"})
    assert "Access-Control-Allow-Origin" not in opaque.headers


async def test_without_origins_nothing_is_added_and_preflight_is_refused(
    aiohttp_client: ClientFactory, cors_app: Callable[[tuple[str, ...]], web.Application]
) -> None:
    client = await aiohttp_client(cors_app(()))
    resp = await client.get("/workflows/wf-1/events", headers={"Origin": ORIGIN})
    assert not CORS_KEYS & set(resp.headers)
    assert "Vary" not in resp.headers
    preflight = await client.options(
        "/workflows/wf-1/events", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}
    )
    assert preflight.status == 403
