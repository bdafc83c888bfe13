"""GET /workflows/{id}/schedule: each node's real and predicted times, from the ETA's futures."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from server import app_keys
from server.problems import Problem
from server.views import authorize_subscribe, workflow_id_of


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


async def get_schedule(request: web.Request) -> web.Response:
    """The predicted schedule, read from the futures of the cached estimate (no new
    simulation): its right edge is the `estimated_completion_at` answered with it."""
    workflow_id = workflow_id_of(request)
    authorize_subscribe(request, workflow_id)
    body = await request.app[app_keys.tracker_key].schedule(workflow_id)
    if body is None:
        raise Problem(
            404,
            f"workflow {workflow_id!r} is unknown (no events, or expired)",
            slug="unknown-workflow",
        )
    return web.json_response(body, dumps=_dumps, headers={"Cache-Control": "no-cache"})
