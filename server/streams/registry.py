"""The open streams of a process: counted against MAX_STREAMS, and ended together at
shutdown.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from server.fanout.ring import Wakeup


class StreamsFull(Exception):
    """MAX_STREAMS streams are open in this process."""


@dataclass(eq=False)
class StreamRegistry:
    """Counts open streams (event, progress, WebSocket) and ends them on shutdown."""

    limit: int
    retry_ms: int
    open: set[StreamHandle] = field(default_factory=set)
    closing: bool = False

    def acquire(self) -> StreamHandle:
        if self.closing:
            raise StreamsFull("server is shutting down")
        if len(self.open) >= self.limit:
            raise StreamsFull(f"{self.limit} streams are open in this process (MAX_STREAMS)")
        handle = StreamHandle()
        self.open.add(handle)
        return handle

    def release(self, handle: StreamHandle) -> None:
        self.open.discard(handle)

    def shutdown(self) -> None:
        """Ask every stream to send a jittered `retry:` and end, so clients spread reconnects."""
        self.closing = True
        for handle in self.open:
            handle.stop(self.retry_ms + random.randint(0, max(self.retry_ms, 1000)))


@dataclass(eq=False, slots=True)
class StreamHandle:
    """Lets the registry stop one stream from outside its task."""

    stopping: bool = False
    retry_ms: int | None = None
    wakeup: Wakeup | None = None  # the stream's own wake-up, so one wait covers both

    def stop(self, retry_ms: int) -> None:
        self.retry_ms = retry_ms
        self.stopping = True
        if self.wakeup is not None:
            self.wakeup.set()

    def client_left(self) -> None:
        """The connection closed: end the stream now (no goodbye), freeing its slot."""
        self.stopping = True
        if self.wakeup is not None:
            self.wakeup.set()
