"""Talking to a running server over HTTP, as the tests and benches do."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp


async def publish(
    base: str,
    wf: str,
    events: Sequence[dict[str, Any]] | dict[str, Any],
    *,
    token: str | None = None,
) -> list[str]:
    """POST one event or a batch to `wf` on the server at `base`; the stored ids (a 201)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = events if isinstance(events, dict) else list(events)
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{base}/workflows/{wf}/events", json=body, headers=headers) as resp,
    ):
        assert resp.status == 201, await resp.text()
        ids: list[str] = (await resp.json())["ids"]
        return ids
