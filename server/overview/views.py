"""The operator's routes: GET /workflows (the run list, or with text/event-stream the live
overview) and GET /definitions/{id}/stats. Thin, as server/views.py: parse, authorise,
call the pieces, answer."""

from __future__ import annotations

from typing import TYPE_CHECKING, get_args

from aiohttp import web

from server import app_keys, auth
from server.models import State, is_workflow_id
from server.overview import feed, runs, summaries
from server.problems import Problem
from server.progress import stats
from server.views import counted, dumps, limit_of, query_problem, single

if TYPE_CHECKING:
    from server import wire

STATES: tuple[str, ...] = get_args(State)  # the SPEC's states, as the models name them


def list_params(request: web.Request) -> tuple[list[str], str | None, int, runs.Cursor | None]:
    """`state` (comma-separated), `definition_id`, `limit` (1..200) and `cursor`, or 400."""
    query = request.query
    states = [s.strip() for s in ",".join(query.getall("state", [])).split(",") if s.strip()]
    bad = [s for s in states if s not in STATES]
    if bad:
        raise query_problem(
            "state",
            f"unknown state {bad[0]!r}; states are {', '.join(STATES)}",
            "not a workflow state",
            "bad-state",
        )
    definition_id = (single(request, "definition_id") or "").strip(" \t") or None
    if definition_id is not None and not is_workflow_id(definition_id):
        raise query_problem(
            "definition_id",
            "definition_id must follow a workflow id's rules",
            "not a definition id",
            "bad-definition-id",
        )
    limit = limit_of(request, runs.PAGE_DEFAULT, runs.PAGE_MAX)
    cursor = None
    text = (single(request, "cursor") or "").strip(" \t")
    if text:
        try:
            cursor = runs.Cursor.decode(text, request.app[app_keys.runs_key].clock())
        except runs.BadCursor as exc:
            raise query_problem("cursor", str(exc), "not a valid cursor", "bad-cursor") from None
    return list(dict.fromkeys(states)), definition_id, limit, cursor


def readable_of(request: web.Request) -> list[str] | None:
    """The workflows the request's token may read (None: all), or 401."""
    secret = request.app[app_keys.settings_key].subscribe_secret
    return counted(request, lambda: auth.readable(auth.subscriber_token(request), secret))


async def list_workflows(request: web.Request) -> web.StreamResponse:
    """GET /workflows: the known runs, most recently updated first (or, asked for
    text/event-stream, the live overview)."""
    states, definition_id, limit, cursor = list_params(request)
    readable = readable_of(request)
    app = request.app
    if "text/event-stream" in request.headers.get("Accept", ""):
        return await feed.overview_stream(request, states, definition_id, limit, readable)
    try:
        found, nxt = await summaries.list_page(
            app[app_keys.runs_key],
            app[app_keys.tracker_key],
            states=states,
            definition_id=definition_id,
            limit=limit,
            cursor=cursor,
            readable=readable,
        )
    except runs.BadCursor as exc:
        raise query_problem("cursor", str(exc), "walk too old", "stale-cursor") from None
    body: wire.RunList = {"workflows": found, "next": None if nxt is None else nxt.encode()}
    return web.json_response(body, dumps=dumps, headers={"Cache-Control": "no-cache"})


def definition_id_of(request: web.Request) -> str:
    """The URL's definition id, held to a workflow id's rules (SPEC), or 400."""
    value = request.match_info.get("definition_id", "")
    if not is_workflow_id(value):
        raise Problem(
            400,
            "definition_id must be 1 to 128 characters of A-Z a-z 0-9 . _ - "
            "starting with a letter or digit",
            slug="bad-definition-id",
        )
    return value


async def get_stats(request: web.Request) -> web.Response:
    """GET /definitions/{id}/stats: per node and node type, from the duration history."""
    definition_id = definition_id_of(request)
    secret = request.app[app_keys.settings_key].subscribe_secret
    counted(
        request, lambda: auth.check_stats(auth.subscriber_token(request), secret, definition_id)
    )
    tracker = request.app[app_keys.tracker_key]
    nodes, types = await stats.load_recent(
        request.app[app_keys.redis_key], definition_id, prefix=tracker.history_prefix
    )
    if not nodes:
        raise Problem(
            404,
            f"no history for definition {definition_id!r} (no finished run recorded, or expired)",
            slug="unknown-definition",
        )
    body = stats.definition_stats(definition_id, nodes, types)
    return web.json_response(body, dumps=dumps, headers={"Cache-Control": "no-cache"})
