"""Prometheus metrics, one registry per app so several apps can share a process."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Metric,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from server.fanout.ring import Frame

NAMESPACE = "wfsse"
STREAM_KINDS = ("events", "progress", "websocket", "overview")
# Publish (the Redis entry id's clock) to the write on a client's socket: 0.5 ms to 10 s.
FANOUT_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Tally:
    """A counter for the hot path: `inc` is a plain int add (prometheus_client's Counter
    takes a lock per call, once per event per stream here); read when scraped."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.value = name, documentation, 0
        registry.register(self)

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.value)

    def describe(self) -> Iterator[Metric]:
        return self.collect()


class Delays:
    """A histogram for the hot path: `observe_frames` bins a whole batch with plain int adds
    (prometheus_client's Histogram takes a lock twice per value: once per event per process
    here, 5% of a worker's CPU under load); read when scraped."""

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        registry.register(self)

    def observe_frames(self, frames: Sequence[Frame], now: float) -> None:
        """The delay of each event, from its id's clock (ms) to `now`, clamped at 0. The
        events of a block were stored by one script: each counts with the first one's."""
        counts, bounds, total = self.counts, self.bounds, 0.0
        for frame in frames:
            delay = now - frame.first[0] / 1000.0
            if delay < 0.0:
                delay = 0.0  # the clocks of Redis and this host differ
            counts[bisect_left(bounds, delay)] += frame.count  # first bound >= delay: `le`
            total += delay * frame.count
        self.sum += total

    def collect(self) -> Iterator[Metric]:
        cumulative, buckets = 0, []
        labels = [repr(float(b)) for b in self.bounds] + ["+Inf"]  # as prometheus_client's
        for label, count in zip(labels, self.counts, strict=True):
            cumulative += count
            buckets.append((label, cumulative))
        yield HistogramMetricFamily(
            self.name, self.documentation, buckets=buckets, sum_value=self.sum
        )

    def describe(self) -> Iterator[Metric]:
        return self.collect()


class Sampled:
    """A counter that its owner keeps as a plain int, read when scraped."""

    def __init__(
        self, name: str, documentation: str, registry: CollectorRegistry, read: Callable[[], int]
    ) -> None:
        self.name, self.documentation, self.read = name, documentation, read
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())

    def describe(self) -> Iterator[Metric]:
        return self.collect()


class Metrics:
    """The server's counters, gauges and the fan-out histogram, on a private registry."""

    def __init__(self, *, process: bool = True) -> None:
        self.registry = CollectorRegistry()
        r, ns = self.registry, NAMESPACE
        if process:
            ProcessCollector(namespace=ns, registry=r)  # RSS and open fds, per process
        self.open_streams = Gauge(
            "open_streams", "Open streams by kind.", ["kind"], namespace=ns, registry=r
        )
        for kind in STREAM_KINDS:
            self.open_streams.labels(kind)  # every kind shows, 0 included
        self.events_published_total = Counter(
            "events_published",
            "Events stored (HTTP, in-process and legacy ingest).",
            namespace=ns,
            registry=r,
        )
        self.events_delivered_total = Tally(
            f"{ns}_events_delivered", "Events written to clients (SSE and WebSocket).", r
        )
        self.fanout_delay_seconds = Delays(
            f"{ns}_fanout_delay_seconds",
            "Time from an event's storage to its first write to a client of this process.",
            FANOUT_BUCKETS,
            r,
        )
        self.replays_total = Counter(
            "replays", "Streams that resumed from a Last-Event-ID.", namespace=ns, registry=r
        )
        self.gaps_total = Counter(
            "gaps",
            "Gap events sent: history trimmed past a client's position.",
            namespace=ns,
            registry=r,
        )
        self.slow_client_catchups_total = Counter(
            "slow_client_catchups",
            "Live queues overflowed and replaced by a read from Redis.",
            namespace=ns,
            registry=r,
        )
        self.redis_reconnects_total = Counter(
            "redis_reconnects",
            "Reconnects of the pub/sub connection to Redis.",
            namespace=ns,
            registry=r,
        )
        self.auth_failures_total = Counter(
            "auth_failures",
            "Refused credentials (401 and 403) by kind and reason.",
            ["kind", "reason"],
            namespace=ns,
            registry=r,
        )
        self.connections_shed_total = Counter(
            "connections_shed",
            "Connections the server closed or refused at a limit, by reason: "
            "head_timeout, body_timeout, evicted (MAX_CONNECTIONS), refused, bad_request.",
            ["reason"],
            namespace=ns,
            registry=r,
        )
        self.requests_abandoned_total = Counter(
            "requests_abandoned",
            "Requests whose client left before their body was complete.",
            namespace=ns,
            registry=r,
        )
        self.run_index_errors_total = Counter(
            "run_index_errors",
            "Run index writes that failed after their events were stored "
            "(the run's next event writes it again).",
            namespace=ns,
            registry=r,
        )
        self.run_index_writes_total = Tally(
            f"{ns}_run_index_writes",
            "Run index update scripts sent (a new state, a plan, a "
            "run new to the process, or a flush of runs that moved on in time).",
            r,
        )
        self.overview_frames_total = Tally(
            f"{ns}_overview_frames",
            "`event: run` frames of changed runs queued to overview "
            "streams (first pages not counted).",
            r,
        )
        self.legacy_ingest_invalid_total = Counter(
            "legacy_ingest_invalid",
            "Legacy channel messages that were not valid events.",
            namespace=ns,
            registry=r,
        )

    def count_appends(self, merged: Callable[[], int], refolded: Callable[[], int]) -> None:
        """The store's counts of appends that met another process's append in between."""
        Sampled(
            f"{NAMESPACE}_appends_merged",
            "Appends that another process's append preceded since their fold, merged by "
            "the append script (no second fold).",
            self.registry,
            merged,
        )
        Sampled(
            f"{NAMESPACE}_appends_refolded",
            "Appends the script refused because another process's append changed what "
            "their fold read (folded again).",
            self.registry,
            refolded,
        )

    def observe_frames(self, frames: Sequence[Frame], *, now: float | None = None) -> None:
        """Record the delay of live frames at their first write to a client of this process."""
        self.fanout_delay_seconds.observe_frames(frames, time.time() if now is None else now)

    def auth_failed(self, kind: str, reason: str) -> None:
        self.auth_failures_total.labels(kind, reason).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)

    async def handler(self, request: web.Request) -> web.Response:
        """GET /metrics."""
        # Given as a header: aiohttp's `content_type=` refuses parameters such as `version`.
        return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
