"""`LEGACY_INGEST=1`: the original engine's pub/sub messages, stored through the normal path.

The original engine PUBLISHes each event as JSON, with `instance_id` for `workflow_id`, on
`workflow:{instance_id}:events`. The bridge PSUBSCRIBEs to `workflow:*:events` on its own
pub/sub connection, validates each message with the event models and appends it with the
publisher, so it is replayable, streamed and counted in progress like any other event.
A message that is not a valid event is counted (`wfsse_legacy_ingest_invalid_total`) and
logged with the reason, never stored.

Exactly once, with any number of server processes: every process ingests every message
under an idempotency key derived from the message's bytes, `legacy:<sha256 hex>` (unless
the message brings its own `idempotency_key`). The store checks the key inside the same
atomic script that appends, so the first process to get there stores the event and the
others get a no-op answered with the same id. No process holds a duty, so nothing fails
over: while any one process is subscribed, every message is stored, once, in the order
it was published. The price: each process does the (cheap, idempotent) append of every
message, and two byte-identical messages on one channel within RETENTION_SECONDS are
stored as one event (the original engine stamps each message with its time, so they
differ). Pub/sub keeps nothing for a disconnected subscriber: a message published while
no process is subscribed is lost, as it was in the original system.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from server import app_keys
from server.models import Event, EventRejected, decode_body, is_workflow_id
from server.publisher import Publisher
from server.redis_client import AnyRedis
from server.redis_keys import (
    LEGACY_CHANNEL_PATTERN,
    LEGACY_CHANNEL_PREFIX,
    LEGACY_CHANNEL_SUFFIX,
)
from server.store import AppendConflict
from server.tasks import stop

logger = logging.getLogger(__name__)

KEY_PREFIX = "legacy:"  # + 64 hex digits: within the 128 characters of an idempotency key
BATCH = 500  # messages taken from the socket at once, appended per workflow in one script
STORE_ATTEMPTS = 5  # per batch of one workflow, with backoff, while Redis hiccups
CONCURRENCY = 8  # appends in flight at once: the pool's connections are shared with requests


class InvalidMessage(ValueError):
    """A legacy message that is not a valid event; the text is the reason."""


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def idempotency_key_of(data: bytes) -> str:
    """The key every process derives from the same message bytes."""
    return KEY_PREFIX + hashlib.sha256(data).hexdigest()


def parse_message(
    channel: bytes | str, data: bytes | str, publisher: Publisher, *, max_bytes: int
) -> tuple[str, Event]:
    """One legacy message -> (workflow_id, validated event); raises InvalidMessage."""
    name = _text(channel)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if not (name.startswith(LEGACY_CHANNEL_PREFIX) and name.endswith(LEGACY_CHANNEL_SUFFIX)):
        raise InvalidMessage(f"channel {name!r} is not workflow:<id>:events")
    workflow_id = name[len(LEGACY_CHANNEL_PREFIX) : -len(LEGACY_CHANNEL_SUFFIX)]
    if not is_workflow_id(workflow_id):
        raise InvalidMessage(f"channel {name!r} does not name a valid workflow id")
    if len(raw) > max_bytes:
        raise InvalidMessage(f"message is {len(raw)} bytes, over {max_bytes}")
    try:
        # The HTTP body's parser: the same nesting limit and finite numbers, checked first.
        obj = decode_body(raw)
    except EventRejected as exc:
        raise InvalidMessage(_reasons(exc)) from None
    except UnicodeEncodeError:
        raise InvalidMessage("a string holds a lone surrogate (\\udXXX): not Unicode") from None
    except ValueError as exc:  # UnicodeDecodeError too
        raise InvalidMessage(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidMessage("not a JSON object")
    if "instance_id" in obj:
        instance_id = obj.pop("instance_id")
        if instance_id != workflow_id:
            raise InvalidMessage(f"instance_id {instance_id!r} does not match the channel")
        if obj.setdefault("workflow_id", instance_id) != instance_id:
            raise InvalidMessage("instance_id and workflow_id differ")
    obj.setdefault("idempotency_key", idempotency_key_of(raw))
    try:
        # decode_body() proved the text storable; the added key is ASCII and not counted.
        events = publisher.validate(
            workflow_id, [obj], batch=False, size=len(raw), text_checked=True
        )
    except EventRejected as exc:
        raise InvalidMessage(_reasons(exc)) from None
    return workflow_id, events[0]


def _reasons(exc: EventRejected) -> str:
    """`loc: msg` per error, for the log line of a message that is not stored."""
    detail = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'event'}: {e['msg']}" for e in exc.errors
    )
    return detail or exc.detail


class LegacyIngest:
    """The bridge: one pattern subscription, each message validated and appended once."""

    def __init__(
        self,
        redis: AnyRedis,
        publisher: Publisher,
        *,
        max_message_bytes: int = 4 * 1024 * 1024,
        on_invalid: Callable[[], None] = lambda: None,
        max_backoff: float = 2.0,
    ) -> None:
        self._redis = redis
        self._publisher = publisher
        self._max_bytes = max_message_bytes
        self._on_invalid = on_invalid
        self._max_backoff = max_backoff
        self._task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self.ready = asyncio.Event()  # set while the pattern subscription is confirmed
        self.received = 0
        self.invalid = 0
        self.failed = 0  # valid events this process could not append (Redis down)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="legacy-ingest")

    async def close(self) -> None:
        await stop([self._task], what="legacy ingest")
        self._task = None

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            pubsub: Any = self._redis.pubsub()
            try:
                await pubsub.psubscribe(LEGACY_CHANNEL_PATTERN)
                while True:
                    batch = [await pubsub.get_message(timeout=None)]
                    while len(batch) < BATCH:
                        more = await pubsub.get_message(timeout=0)
                        if more is None:
                            break
                        batch.append(more)
                    messages = [m for m in batch if m is not None and m["type"] == "pmessage"]
                    if any(m is not None and m["type"] == "psubscribe" for m in batch):
                        logger.info("legacy ingest subscribed to %s", LEGACY_CHANNEL_PATTERN)
                        self.ready.set()
                        backoff = 0.05
                    if messages:
                        await self.handle([(m["channel"], m["data"]) for m in messages])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection loss or a parser surprise: reconnect
                logger.warning(
                    "legacy ingest lost Redis (%s: %s); retrying in %.2fs",
                    type(exc).__name__,
                    exc,
                    backoff,
                )
            finally:
                self.ready.clear()
                with suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def handle(self, messages: list[tuple[bytes | str, bytes | str]]) -> None:
        """Validate messages and append the valid ones, in order per workflow."""
        self.received += len(messages)
        by_workflow: dict[str, list[Event]] = {}
        for channel, data in messages:
            try:
                workflow_id, event = parse_message(
                    channel, data, self._publisher, max_bytes=self._max_bytes
                )
            except Exception as exc:  # InvalidMessage, or any surprise: never crash the bridge
                self.invalid += 1
                self._on_invalid()
                logger.warning("legacy message on %r not stored: %s", _safe(channel), exc)
                continue
            by_workflow.setdefault(workflow_id, []).append(event)
        # Workflows are independent: append them concurrently, each one's events in order.
        await asyncio.gather(*(self._store(wf, events) for wf, events in by_workflow.items()))

    async def _store(self, workflow_id: str, events: list[Event]) -> None:
        delay = 0.05
        for attempt in range(1, STORE_ATTEMPTS + 1):
            try:
                # A retry after an append that did happen is a no-op: the keys are known.
                async with self._slots:
                    await self._publisher.store_events(workflow_id, events)
                return
            except (RedisError, OSError, AppendConflict) as exc:
                if attempt == STORE_ATTEMPTS:
                    # Another process may still store them; this one has to move on.
                    self.failed += len(events)
                    logger.error(
                        "legacy ingest could not append %d events of %s: %s",
                        len(events),
                        workflow_id,
                        exc,
                    )
                    return
                await asyncio.sleep(delay)
                delay *= 2
            except Exception:  # a surprise in one workflow's batch must not stop the bridge
                self.failed += len(events)
                logger.exception("legacy ingest could not append events of %s", workflow_id)
                return


def _safe(channel: bytes | str) -> str:
    return channel if isinstance(channel, str) else channel.decode("utf-8", "replace")


legacy_key: web.AppKey[LegacyIngest] = web.AppKey("legacy_ingest", LegacyIngest)


async def legacy_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: run the bridge while the app runs (after the context that opens Redis)."""
    settings = app[app_keys.settings_key]
    ingest = LegacyIngest(
        app[app_keys.redis_key],
        app[app_keys.publisher_key],
        max_message_bytes=settings.max_body_bytes,
        on_invalid=app[app_keys.metrics_key].legacy_ingest_invalid_total.inc,
    )
    app[legacy_key] = ingest
    await ingest.start()
    yield
    await ingest.close()
