"""The Python publisher a workflow engine calls in-process; HTTP publishing uses it too."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import BaseModel

from server.models import MAX_BATCH, Event, EventRejected, is_workflow_id, validate_event
from server.overview.runs import RunIndex
from server.progress.service import ProgressService
from server.redis_client import AnyRedis, open_redis
from server.settings import Settings
from server.store import Appended, Store, id_key

if TYPE_CHECKING:
    from server import wire

logger = logging.getLogger(__name__)

RawEvent = BaseModel | Mapping[str, Any]
AfterAppend = Callable[[str, Appended], Awaitable[None]]


class Publisher:
    """Validates events and appends them through the store's one atomic path."""

    def __init__(
        self,
        store: Store,
        *,
        max_event_bytes: int = 64 * 1024,
        after_append: AfterAppend | None = None,
        on_published: Callable[[int], None] = lambda n: None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.max_event_bytes = max_event_bytes
        self._after_append = after_append
        self._on_published = on_published
        self._clock = clock

    def validate(
        self,
        workflow_id: str,
        raw: Sequence[Any],
        *,
        batch: bool,
        size: int | None = None,
        text_checked: bool = False,
    ) -> list[Event]:
        """Validate events all-or-nothing; raises EventRejected listing every error.

        `size` is the received byte size of a single (non-batch) event, or of the whole
        batch, when known. `text_checked`: the events come from models.decode_body(), so
        their strings are known to be storable as UTF-8.
        """
        if not is_workflow_id(workflow_id):
            raise ValueError(f"invalid workflow_id {workflow_id!r}")
        if not 1 <= len(raw) <= MAX_BATCH:
            raise EventRejected(
                f"a batch holds 1 to {MAX_BATCH} events, got {len(raw)}",
                [{"loc": [], "msg": f"expected 1 to {MAX_BATCH} events"}],
            )
        now = self._clock()
        # In a batch each event is measured on its own, unless the whole body is within the
        # limit: then every event in it was too, as received.
        item_size = size
        if batch and not (text_checked and size is not None and size <= self.max_event_bytes):
            item_size = None
        events: list[Event] = []
        errors: list[wire.ProblemError] = []
        for i, item in enumerate(raw):
            try:
                events.append(
                    validate_event(
                        item,
                        workflow_id,
                        max_event_bytes=self.max_event_bytes,
                        now=now,
                        size=item_size,
                        loc_prefix=(i,) if batch else (),
                        text_checked=text_checked,
                    )
                )
            except EventRejected as exc:
                errors.extend(exc.errors)
        if errors:
            detail = errors[0]["msg"] if len(errors) == 1 else f"{len(errors)} validation errors"
            raise EventRejected(f"invalid event: {detail}; nothing was stored", errors)
        return events

    async def store_events(self, workflow_id: str, events: Sequence[Event]) -> list[str]:
        """Append already-validated events; returns their ids in input order."""
        appended = await self.store.append(workflow_id, events)
        self._on_published(len(appended.new_events))
        if self._after_append is not None and appended.new_events:
            try:
                await self._after_append(workflow_id, appended)
            except Exception:  # the events are stored; a side effect must not fail the publish
                logger.exception("after-append hook failed for %s", workflow_id)
        return appended.ids

    async def publish(self, workflow_id: str, event: RawEvent) -> str:
        """Validate and store one event; returns its stream id."""
        ids = await self.store_events(workflow_id, self.validate(workflow_id, [event], batch=False))
        return ids[0]

    async def publish_many(self, workflow_id: str, events: Sequence[RawEvent]) -> list[str]:
        """Validate and store a batch atomically (all or nothing); ids in input order."""
        return await self.store_events(
            workflow_id, self.validate(workflow_id, list(events), batch=True)
        )

    async def emit_node_event(
        self,
        instance_id: str,
        event_type: str,
        node_id: str,
        node_name: str | None = None,
        node_type: str | None = None,
        duration_ms: int | None = None,
        error: str | None = None,
        output: dict[str, Any] | None = None,
    ) -> str:
        """The original engine's call shape: one node event; returns its stream id."""
        fields: dict[str, Any] = {
            "node_name": node_name,
            "node_type": node_type,
            "duration_ms": duration_ms,
            "error": error,
            "output": output,
        }
        event: dict[str, Any] = {"event_type": event_type, "node_id": node_id}
        event.update({k: v for k, v in fields.items() if v is not None})
        return await self.publish(instance_id, event)

    async def emit_state_change(
        self, instance_id: str, from_state: str | None, to_state: str, reason: str | None = None
    ) -> str:
        """The original engine's call shape: a workflow state change; returns its stream id."""
        event: dict[str, Any] = {"event_type": "workflow_state_changed", "to_state": to_state}
        if from_state is not None:
            event["from_state"] = from_state
        if reason is not None:
            event["reason"] = reason
        return await self.publish(instance_id, event)


class WritePath(NamedTuple):
    store: Store
    tracker: ProgressService
    publisher: Publisher
    runs: RunIndex


def index_hook(index: RunIndex, on_error: Callable[[], None] = lambda: None) -> AfterAppend:
    """After an append: the run index (when a field it sorts or filters by changed)."""

    async def after(workflow_id: str, appended: Appended) -> None:
        last = max(appended.ids, key=id_key)
        try:
            await index.note(workflow_id, last, appended.new_events)
        except Exception:  # the events are stored: the index catches up with the next one
            on_error()
            raise

    return after


def chain(*hooks: AfterAppend) -> AfterAppend:
    """Run after-append hooks in turn; one that fails does not stop the others."""

    async def after(workflow_id: str, appended: Appended) -> None:
        for hook in hooks:
            try:
                await hook(workflow_id, appended)
            except Exception:
                logger.exception("after-append hook %s failed for %s", hook, workflow_id)

    return after


def assemble(
    settings: Settings,
    redis: AnyRedis,
    *,
    on_published: Callable[[int], None] = lambda n: None,
    on_index_error: Callable[[], None] = lambda: None,
    on_index_write: Callable[[], None] = lambda: None,
) -> WritePath:
    """The write path as the server and an out-of-process engine both use it (the run
    index included: a run an engine publishes in-process is listed like any other)."""
    store = Store(
        redis,
        maxlen=settings.history_maxlen,
        retention_seconds=settings.retention_seconds,
        min_replicas_ack=settings.min_replicas_ack,
    )
    tracker = ProgressService(
        store,
        redis,
        history_ttl=settings.history_ttl_seconds,
        history_prefix=settings.history_prefix,
    )
    index = RunIndex(
        redis,
        retention_seconds=settings.retention_seconds,
        on_error=on_index_error,
        on_write=on_index_write,
    )
    publisher = Publisher(
        store,
        max_event_bytes=settings.max_event_bytes,
        after_append=chain(tracker.record_history, index_hook(index)),
        on_published=on_published,
    )
    return WritePath(store, tracker, publisher, index)


@asynccontextmanager
async def connect(redis_url: str | None = None, **options: Any) -> AsyncIterator[Publisher]:
    """A publisher on its own Redis connection, for an engine outside the server process.

    `options` are Settings fields (history_maxlen, retention_seconds, max_event_bytes...)
    and must match the server's.
    """
    settings = Settings(redis_url=redis_url, **options)
    async with open_redis(settings.redis_url) as redis:
        path = assemble(settings, redis)
        try:
            yield path.publisher
        finally:
            await path.runs.close()
