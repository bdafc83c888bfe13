"""Typed application state keys, shared by the app factory and the handlers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from .metrics import Metrics
from .settings import Settings

if TYPE_CHECKING:
    from .hub import Hub
    from .overview_feed import OverviewFeed
    from .publisher import Publisher
    from .runs import RunIndex
    from .store import AnyRedis, Store
    from .streams import StreamRegistry
    from .tracker import ProgressService
    from .watchers import WatcherCounts

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
