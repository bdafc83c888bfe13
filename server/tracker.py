"""Progress as served: the stored fold, the duration history, and what was last shown."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from . import history, progress
from .store import AnyRedis, Appended, Store


class ProgressService:
    """Reads progress in O(1) round trips, whatever the length of the history."""

    def __init__(
        self,
        store: Store,
        redis: AnyRedis,
        *,
        history_ttl: int,
        clock: Callable[[], float] = time.time,
        history_prefix: str = "wfsse",
    ) -> None:
        self.store = store
        self.redis = redis
        self.history_ttl = history_ttl
        self.clock = clock
        self.history_prefix = history_prefix

    async def snapshot(self, workflow_id: str) -> dict[str, Any] | None:
        """The SPEC's progress object, or None for an unknown workflow."""
        stored = await self.store.load_progress(workflow_id)
        if stored is None:
            return None
        state, last_id, shown_raw = stored.state, stored.last_event_id, stored.shown
        definition_id, node_ids, node_types = progress.history_keys(state)
        view = await history.load(
            self.redis, definition_id, node_ids, node_types, prefix=self.history_prefix
        )
        shown = progress.loads_shown(shown_raw) if shown_raw else None
        snap, new_shown = progress.snapshot(
            state,
            workflow_id=workflow_id,
            last_event_id=last_id,
            history=view,
            now=self.clock(),
            shown=shown,
        )
        if new_shown != shown:
            await self.store.save_shown(workflow_id, progress.dumps_shown(new_shown))
        return snap

    async def record_history(self, workflow_id: str, appended: Appended) -> None:
        """After an append: durations of a finished run go into the history."""
        if appended.history:
            await history.record(
                self.redis, appended.history, ttl_seconds=self.history_ttl,
                prefix=self.history_prefix,
            )  # fmt: skip
