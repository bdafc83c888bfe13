"""Typed application state keys, shared by the app factory and the handlers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from server.metrics import Metrics
from server.settings import Settings

if TYPE_CHECKING:
    from server.fanout.hub import Hub
    from server.overview.feed import OverviewFeed
    from server.overview.runs import RunIndex
    from server.progress.service import ProgressService
    from server.publisher import Publisher
    from server.redis_client import AnyRedis
    from server.store import Store
    from server.streams.registry import StreamRegistry
    from server.streams.watchers import WatcherCounts

settings_key = web.AppKey("settings", Settings)
redis_key: web.AppKey[AnyRedis] = web.AppKey("redis")
store_key: web.AppKey[Store] = web.AppKey("store")
hub_key: web.AppKey[Hub] = web.AppKey("hub")
publisher_key: web.AppKey[Publisher] = web.AppKey("publisher")
streams_key: web.AppKey[StreamRegistry] = web.AppKey("streams")
tracker_key: web.AppKey[ProgressService] = web.AppKey("tracker")
metrics_key = web.AppKey("metrics", Metrics)
watchers_key: web.AppKey[WatcherCounts] = web.AppKey("watchers")
runs_key: web.AppKey[RunIndex] = web.AppKey("runs")
overview_key: web.AppKey[OverviewFeed] = web.AppKey("overview")
