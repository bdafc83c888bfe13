"""The progress stream: `event: progress` frames, sent when progress changes, at most
4 per second.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from aiohttp import web
from redis.exceptions import RedisError

from server import sse
from server.fanout.ring import Subscription
from server.models import TERMINAL_STATES
from server.streams.events import (
    CONFIRM_GRACE_SECONDS,
    Heartbeat,
    ProgressFn,
    wait_for_wakeup,
)
from server.streams.registry import StreamHandle

if TYPE_CHECKING:
    from server import wire


def progress_frame(snap: wire.Progress) -> bytes:
    """An `event: progress` frame; its id lets a reconnect after the end get 204."""
    return sse.encode(
        json.dumps(snap, ensure_ascii=False, separators=(",", ":")),
        id=snap.get("last_event_id") or None,
        event="progress",
    )


def is_final(snap: wire.Progress) -> bool:
    return snap.get("state") in TERMINAL_STATES


class ProgressStream:
    """Progress objects as they change, at most `rate` per second, ending after terminal."""

    __slots__ = ("handle", "heartbeat", "min_interval", "response", "snapshot", "sub")

    def __init__(
        self,
        response: web.StreamResponse,
        sub: Subscription,
        *,
        snapshot: ProgressFn,
        heartbeat: float,
        handle: StreamHandle,
        min_interval: float = 0.25,
    ) -> None:
        self.response = response
        self.sub = sub
        self.snapshot = snapshot
        self.heartbeat = heartbeat
        self.handle = handle
        self.min_interval = min_interval
        handle.wakeup = sub.wakeup
        sub.notify_only = True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_sent: str | None = None
        sent_at = -1e9
        beat = Heartbeat(self.sub.wakeup, self.heartbeat)
        # As for events: the first object does not wait for a late confirmation longer than
        # CONFIRM_GRACE_SECONDS (the confirmation wakes this stream again when it comes).
        grace_at = loop.time() + CONFIRM_GRACE_SECONDS
        grace = None if self.sub.confirmed else loop.call_at(grace_at, self.sub.wakeup.set)
        try:
            while not (self.sub.confirmed or self.handle.stopping or loop.time() >= grace_at):
                if not await wait_for_wakeup(self.sub, self.handle, beat):
                    await self.response.write(sse.KEEP_ALIVE)
                    beat.wrote()
            while not self.handle.stopping:
                self.sub.restart()  # only "something changed" matters here
                wait = sent_at + self.min_interval - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)  # the rate limit of the SPEC: 4 per second
                try:
                    snap = await self.snapshot(self.sub.workflow_id)
                except RedisError:
                    snap = None  # Redis is down: keep the client, try again on the next wake
                if snap is not None and snap["last_event_id"] != last_sent:
                    await self.response.write(progress_frame(snap))
                    beat.wrote()
                    last_sent, sent_at = snap["last_event_id"], loop.time()
                    if is_final(snap):
                        break
                if not await wait_for_wakeup(self.sub, self.handle, beat):
                    await self.response.write(sse.KEEP_ALIVE)
                    beat.wrote()
            if self.handle.retry_ms is not None:
                await self.response.write(sse.encode(retry=self.handle.retry_ms))
        except (ConnectionResetError, ConnectionError, RuntimeError):
            return
        finally:
            beat.cancel()
            if grace is not None:
                grace.cancel()
