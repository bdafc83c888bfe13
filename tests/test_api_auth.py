"""Auth and CORS over the wire, against the real app: every case of the SPEC's Security section."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
import pytest

from testing import tokens
from testing.events import DONE
from testing.metrics import sample
from testing.procs import ROOT
from tests.conftest import Serve

PUBLISH_TOKEN = "pub-" + "p" * 40
SECRET = "sub-" + "s" * 60
ORIGIN = "https://app.example"
SETTINGS = {
    "publish_token": PUBLISH_TOKEN,
    "subscribe_secret": SECRET,
    "cors_origins": (ORIGIN,),
}
ENDPOINTS = ["events", "progress"]


forge = functools.partial(tokens.forge, key=SECRET)


def later() -> int:
    return int(time.time()) + 600


# name -> (token for workflow `wf`, expected status). 200 means "the stream or the progress".
BAD_TOKENS: dict[str, Callable[[str], tuple[str | None, int]]] = {
    "no token": lambda wf: (None, 401),
    "garbage": lambda wf: ("not.a.jwt", 401),
    "expired": lambda wf: (forge({"workflows": [wf], "exp": int(time.time()) - 5}), 401),
    "wrong signature": lambda wf: (
        forge({"workflows": [wf], "exp": later()}, key="other-" + "o" * 60),
        401,
    ),
    "alg none": lambda wf: (tokens.unsigned({"workflows": [wf], "exp": later()}), 401),
    "HS512": lambda wf: (
        forge({"workflows": [wf], "exp": later()}, key=SECRET * 2, alg="HS512"),
        401,
    ),
    "no exp": lambda wf: (forge({"workflows": [wf]}), 401),
    "no workflows claim": lambda wf: (forge({"exp": later()}), 401),
    "workflows not a list": lambda wf: (forge({"workflows": wf, "exp": later()}), 401),
    "another workflow": lambda wf: (forge({"workflows": ["someone-else"], "exp": later()}), 403),
}
GOOD_TOKENS: dict[str, Callable[[str], str]] = {
    "this workflow": lambda wf: forge({"workflows": [wf], "exp": later()}),
    "star": lambda wf: forge({"workflows": ["*"], "exp": later()}),
    "one of several": lambda wf: forge({"workflows": ["x", wf, "y"], "exp": later()}),
}
SOURCES = ["header", "query", "cookie"]


def carry(token: str, source: str) -> tuple[dict[str, str], dict[str, str]]:
    """Headers and query parameters that carry `token` the way `source` does."""
    if source == "header":
        return {"Authorization": f"Bearer {token}"}, {}
    if source == "query":
        return {}, {"access_token": token}
    return {"Cookie": f"access_token={token}"}, {}  # what a browser sends along


async def publish(
    s: aiohttp.ClientSession, base: str, wf: str, event: dict[str, Any], token: str | None
) -> aiohttp.ClientResponse:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with s.post(f"{base}/workflows/{wf}/events", json=event, headers=headers) as resp:
        await resp.read()
        return resp


async def finished_workflow(s: aiohttp.ClientSession, base: str, wf: str) -> None:
    """A workflow with a terminal event: its stream ends by itself, its progress exists."""
    for event in ({"event_type": "node_started", "node_id": "a"}, DONE):
        assert (await publish(s, base, wf, event, PUBLISH_TOKEN)).status == 201


async def read(
    s: aiohttp.ClientSession,
    base: str,
    wf: str,
    endpoint: str,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    url = f"{base}/workflows/{wf}/{endpoint}"
    async with asyncio.timeout(10):
        async with s.get(url, headers=headers or {}, params=params or {}) as resp:
            return resp.status, dict(resp.headers), await resp.read()


def problem(status: int, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    assert headers["Content-Type"].startswith("application/problem+json"), headers
    doc: dict[str, Any] = json.loads(body)
    assert doc["status"] == status and doc["title"] and doc["detail"] and doc["type"]
    return doc


# Publishing -------------------------------------------------------------------------------


async def test_publish_needs_the_publish_token(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(**SETTINGS), new_workflow()
    event = {"event_type": "node_started", "node_id": "a"}
    async with aiohttp.ClientSession() as s:
        for token, challenge in [
            (None, 'Bearer realm="publish"'),
            ("wrong-" + "w" * 40, 'Bearer realm="publish", error="invalid_token"'),
            (PUBLISH_TOKEN + "x", 'Bearer realm="publish", error="invalid_token"'),
            ("", 'Bearer realm="publish"'),
        ]:
            headers = {} if token is None else {"Authorization": f"Bearer {token}"}
            async with s.post(f"{base}/workflows/{wf}/events", json=event, headers=headers) as r:
                assert r.status == 401, token
                problem(401, dict(r.headers), await r.read())
                assert r.headers["WWW-Authenticate"] == challenge
        # A stranger gets 401 before the body is looked at: no 415 or 422 that leaks the API.
        async with s.post(
            f"{base}/workflows/{wf}/events",
            data=b"not json",
            headers={"Content-Type": "text/plain"},
        ) as r:
            assert r.status == 401
        async with s.get(
            f"{base}/workflows/{wf}/progress",
            params={"access_token": forge({"workflows": [wf], "exp": later()})},
        ) as r:
            assert r.status == 404  # nothing was stored by the refused requests
        ok = await publish(s, base, wf, event, PUBLISH_TOKEN)
        assert ok.status == 201
        # The scheme is case-insensitive (RFC 7235); the token itself is not.
        async with s.post(
            f"{base}/workflows/{wf}/events",
            json=event,
            headers={"Authorization": f"bearer {PUBLISH_TOKEN}"},
        ) as r:
            assert r.status == 201
        async with s.post(
            f"{base}/workflows/{wf}/events",
            json=event,
            headers={"Authorization": f"Bearer {PUBLISH_TOKEN.upper()}"},
        ) as r:
            assert r.status == 401


# Reading: streams and progress ------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_refused_tokens_on_streams_and_progress(
    serve: Serve, new_workflow: Callable[[], str], endpoint: str, case: str
) -> None:
    base, wf = await serve(**SETTINGS), new_workflow()
    token, expected = BAD_TOKENS[case](wf)
    async with aiohttp.ClientSession() as s:
        await finished_workflow(s, base, wf)
        for source in SOURCES if token is not None else ["header"]:
            headers, params = carry(token, source) if token is not None else ({}, {})
            status, got, body = await read(s, base, wf, endpoint, headers, params)
            assert status == expected, (case, source, body)
            doc = problem(status, got, body)
            assert token is None or token not in body.decode()  # never echoed
            if expected == 401:
                assert got["WWW-Authenticate"].startswith('Bearer realm="subscribe"')
                invalid = 'error="invalid_token"' in got["WWW-Authenticate"]
                assert invalid == (token is not None)
            else:
                assert doc["type"] == "/problems/forbidden-workflow"
                assert "WWW-Authenticate" not in got


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("case", sorted(GOOD_TOKENS))
async def test_accepted_tokens_from_header_query_and_cookie(
    serve: Serve, new_workflow: Callable[[], str], endpoint: str, source: str, case: str
) -> None:
    base, wf = await serve(**SETTINGS), new_workflow()
    headers, params = carry(GOOD_TOKENS[case](wf), source)
    async with aiohttp.ClientSession() as s:
        await finished_workflow(s, base, wf)
        status, got, body = await read(s, base, wf, endpoint, headers, params)
    assert status == 200, body
    if endpoint == "events":
        assert got["Content-Type"] == "text/event-stream; charset=utf-8"
        assert body.count(b"\nevent: ") == 2 and b"COMPLETED" in body  # the whole finished run
    else:
        assert json.loads(body)["state"] == "COMPLETED"


async def test_a_token_for_another_workflow_stays_refused_in_every_source(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, mine, theirs = await serve(**SETTINGS), new_workflow(), new_workflow()
    token = forge({"workflows": [mine], "exp": later()})
    async with aiohttp.ClientSession() as s:
        await finished_workflow(s, base, theirs)
        for endpoint in ENDPOINTS:
            for source in SOURCES:
                status, _, _ = await read(s, base, theirs, endpoint, *carry(token, source))
                assert status == 403, (endpoint, source)


async def test_header_wins_over_query_and_cookie(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(**SETTINGS), new_workflow()
    good = forge({"workflows": [wf], "exp": later()})
    bad = forge({"workflows": [wf], "exp": int(time.time()) - 5})
    async with aiohttp.ClientSession() as s:
        await finished_workflow(s, base, wf)
        status, _, _ = await read(
            s,
            base,
            wf,
            "progress",
            {"Authorization": f"Bearer {bad}", "Cookie": f"access_token={good}"},
            {"access_token": good},
        )
        assert status == 401
        status, _, _ = await read(
            s, base, wf, "progress", {"Authorization": f"Bearer {good}"}, {"access_token": bad}
        )
        assert status == 200


async def test_auth_failures_are_counted_in_metrics(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(**SETTINGS), new_workflow()
    expected = {
        ("publish", "missing"): 1,
        ("publish", "wrong_token"): 2,
        ("subscribe", "missing"): 2,
        ("subscribe", "expired"): 1,
        ("subscribe", "bad_signature"): 1,
        ("subscribe", "algorithm"): 2,
        ("subscribe", "claims"): 2,
        ("subscribe", "forbidden"): 3,
    }
    async with aiohttp.ClientSession() as s:
        before = await (await s.get(f"{base}/metrics")).text()
        await finished_workflow(s, base, wf)
        event = {"event_type": "node_started", "node_id": "b"}
        assert (await publish(s, base, wf, event, None)).status == 401
        assert (await publish(s, base, wf, event, "nope")).status == 401
        assert (await publish(s, base, wf, event, "nope-again")).status == 401
        cases = [
            "no token",
            "expired",
            "wrong signature",
            "alg none",
            "HS512",
            "no exp",
            "no workflows claim",
            "another workflow",
        ]
        for i, case in enumerate(cases):
            token, status = BAD_TOKENS[case](wf)
            headers, params = carry(token, SOURCES[i % 3]) if token else ({}, {})
            assert (await read(s, base, wf, ENDPOINTS[i % 2], headers, params))[0] == status
        other = BAD_TOKENS["another workflow"](wf)[0]
        assert other is not None
        for endpoint in ENDPOINTS:
            assert (await read(s, base, wf, endpoint, *carry(other, "query")))[0] == 403
        assert (await read(s, base, wf, "events"))[0] == 401
        after = await (await s.get(f"{base}/metrics")).text()
    for (kind, reason), count in expected.items():
        name = "wfsse_auth_failures_total"
        labels = {"kind": kind, "reason": reason}
        delta = (sample(after, name, **labels) or 0.0) - (sample(before, name, **labels) or 0.0)
        assert delta == count, (kind, reason, delta)
    assert PUBLISH_TOKEN not in after and SECRET not in after


# CORS -------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_preflight_from_the_allowed_origin(
    serve: Serve, new_workflow: Callable[[], str], endpoint: str
) -> None:
    base, wf = await serve(**SETTINGS), new_workflow()
    async with aiohttp.ClientSession() as s:
        async with s.options(
            f"{base}/workflows/{wf}/{endpoint}",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization, last-event-id",
            },
        ) as r:
            assert r.status == 204
            assert await r.read() == b""
            assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert r.headers["Access-Control-Allow-Credentials"] == "true"
            assert "GET" in r.headers["Access-Control-Allow-Methods"]
            allowed = {
                h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")
            }
            assert {"authorization", "last-event-id"} <= allowed
            assert "Origin" in r.headers["Vary"]


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "https://app.example.evil"])
async def test_preflight_from_another_origin_is_refused(
    serve: Serve, new_workflow: Callable[[], str], origin: str
) -> None:
    base, wf = await serve(**SETTINGS), new_workflow()
    async with aiohttp.ClientSession() as s:
        async with s.options(
            f"{base}/workflows/{wf}/events",
            headers={"Origin": origin, "Access-Control-Request-Method": "GET"},
        ) as r:
            assert r.status == 403
            problem(403, dict(r.headers), await r.read())
            assert "Access-Control-Allow-Origin" not in r.headers
            assert "Access-Control-Allow-Credentials" not in r.headers


async def test_eventsource_request_from_the_allowed_origin_can_read_the_stream(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    """What `new EventSource(url, {withCredentials: true})` sends: Origin, a cookie, no headers."""
    base, wf = await serve(**SETTINGS), new_workflow()
    token = forge({"workflows": [wf], "exp": later()})
    async with aiohttp.ClientSession() as s:
        assert (
            await publish(
                s, base, wf, {"event_type": "node_started", "node_id": "a"}, PUBLISH_TOKEN
            )
        ).status == 201
        async with s.get(
            f"{base}/workflows/{wf}/events",
            headers={
                "Origin": ORIGIN,
                "Accept": "text/event-stream",
                "Cache-Control": "no-cache",
                "Cookie": f"access_token={token}",
            },
        ) as r:
            # The headers of a stream that is still open: the page can read it while it runs.
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
            assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert r.headers["Access-Control-Allow-Credentials"] == "true"
            assert "Origin" in r.headers["Vary"]
            async with asyncio.timeout(10):
                first = await r.content.readuntil(b"\n\n")
                assert first == b"retry: 3000\n\n"
                frame = await r.content.readuntil(b"\n\n")
            assert b"event: node_started\n" in frame
        # A refusal is readable by the page too (so it can tell 401 from a network error).
        async with s.get(f"{base}/workflows/{wf}/events", headers={"Origin": ORIGIN}) as r:
            assert r.status == 401
            assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
        # Another origin gets the stream (auth decides) but no permission for its page to read it.
        async with s.get(
            f"{base}/workflows/{wf}/progress",
            headers={"Origin": "https://evil.example", "Cookie": f"access_token={token}"},
        ) as r:
            assert r.status == 200
            assert "Access-Control-Allow-Origin" not in r.headers


# The token CLI ----------------------------------------------------------------------------


async def test_cli_token_is_accepted_for_its_workflow_and_refused_for_another(
    serve: Serve, new_workflow: Callable[[], str]
) -> None:
    base, wf, other = await serve(**SETTINGS), new_workflow(), new_workflow()
    env = {**os.environ, "SUBSCRIBE_SECRET": SECRET}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "token",
        wf,
        "--ttl",
        "60",
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    lines = out.decode().splitlines()
    assert len(lines) == 1, out  # only the token on stdout, so `$(...)` captures it
    token = lines[0]
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["workflows"] == [wf]
    assert 55 <= claims["exp"] - time.time() <= 61
    assert SECRET not in out.decode() + err.decode()
    async with aiohttp.ClientSession() as s:
        await finished_workflow(s, base, wf)
        await finished_workflow(s, base, other)
        for endpoint in ENDPOINTS:
            assert (await read(s, base, wf, endpoint, *carry(token, "query")))[0] == 200
            assert (await read(s, base, other, endpoint, *carry(token, "header")))[0] == 403
