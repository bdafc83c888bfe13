"""The application factory: wires settings, Redis, store, hub and routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from server import app_keys, cors, legacy, openapi, schedule, views
from server.dashboard import static_dir
from server.fanout.hub import Hub
from server.metrics import Metrics
from server.overview import views as overview_views
from server.overview.feed import OverviewFeed
from server.problems import problem_middleware
from server.publisher import assemble
from server.redis_client import AnyRedis, open_redis
from server.settings import Settings
from server.streams import watchers, websocket
from server.streams.registry import StreamRegistry

logger = logging.getLogger(__name__)

# A permissive pattern: aiohttp's default excludes `{` `}`, which must answer 400, not 404.
WF = "{workflow_id:[^/]+}"


def create_app(settings: Settings, *, redis: AnyRedis | None = None) -> web.Application:
    """Build the app; no I/O here. Without `redis`, one is opened from settings on startup."""
    app = web.Application(middlewares=[problem_middleware], client_max_size=settings.max_body_bytes)
    app[app_keys.settings_key] = settings
    app[app_keys.streams_key] = StreamRegistry(settings.max_streams, settings.retry_ms)
    app[app_keys.metrics_key] = metrics = Metrics()
    app[app_keys.watchers_key] = watchers.WatcherCounts()
    cors.setup_cors(app, settings.cors_origins)

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        if redis is not None:
            await _wire(app, settings, redis)
            yield
            await _unwire(app)
            return
        async with open_redis(settings.redis_url) as client:
            await _wire(app, settings, client)
            yield
            await _unwire(app)

    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(watchers.reporter_ctx)  # after redis_ctx: it reports to Redis
    if settings.legacy_ingest:
        app.cleanup_ctx.append(legacy.legacy_ctx)  # after redis_ctx: it uses the publisher
    if settings.demo:
        from server import demo

        demo.setup_demo(app)
    app.on_shutdown.append(_end_streams)

    app.router.add_get("/workflows", overview_views.list_workflows)
    app.router.add_post(f"/workflows/{WF}/events", views.publish_events)
    app.router.add_get(f"/workflows/{WF}/events", views.stream_events)
    app.router.add_get(f"/workflows/{WF}/ws", websocket.websocket_events)
    app.router.add_get("/api/v1/workflows/ws/{instance_id:[^/]+}", websocket.websocket_events)
    app.router.add_get(f"/workflows/{WF}/progress", views.get_progress)
    app.router.add_get(f"/workflows/{WF}/schedule", schedule.get_schedule)
    app.router.add_get("/definitions/{definition_id:[^/]+}/stats", overview_views.get_stats)
    app.router.add_get("/", views.index)
    app.router.add_static("/static/", static_dir(), append_version=True)
    app.router.add_get("/healthz", views.healthz)
    app.router.add_get("/readyz", views.readyz)
    app.router.add_get("/metrics", metrics.handler)
    app.router.add_get("/openapi.json", openapi.openapi_handler)
    return app


async def _wire(app: web.Application, settings: Settings, redis: AnyRedis) -> None:
    metrics = app[app_keys.metrics_key]
    store, tracker, publisher, index = assemble(
        settings,
        redis,
        on_published=metrics.events_published_total.inc,
        on_index_error=metrics.run_index_errors_total.inc,
        on_index_write=metrics.run_index_writes_total.inc,
    )
    metrics.count_appends(lambda: store.merged, lambda: store.refolded)
    hub = Hub(
        redis,
        queue_limit=settings.client_queue_frames,
        queue_bytes=settings.client_queue_bytes,
        on_reconnect=metrics.redis_reconnects_total.inc,
        on_overflow=metrics.slow_client_catchups_total.inc,
        on_state=store.follow,
    )
    await hub.start()
    app[app_keys.redis_key] = redis
    app[app_keys.store_key] = store
    app[app_keys.hub_key] = hub
    app[app_keys.tracker_key] = tracker
    app[app_keys.publisher_key] = publisher
    app[app_keys.runs_key] = index
    app[app_keys.overview_key] = OverviewFeed(
        hub, index, tracker, redis, on_frame=metrics.overview_frames_total.inc
    )


async def _unwire(app: web.Application) -> None:
    await app[app_keys.overview_key].close()
    await app[app_keys.runs_key].close()
    await app[app_keys.hub_key].close()


async def _end_streams(app: web.Application) -> None:
    app[app_keys.streams_key].shutdown()
