"""One frozen Settings object, built once from the environment and command-line flags."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

_PREFIX = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class Settings:
    """Every knob of the SPEC's Configuration section; the defaults are the SPEC's."""

    host: str = "127.0.0.1"
    port: int = 8080
    redis_url: str | None = None
    heartbeat_seconds: float = 15.0
    retry_ms: int = 3000
    history_maxlen: int = 10_000
    retention_seconds: int = 86_400
    max_body_bytes: int = 4 * 1024 * 1024
    max_event_bytes: int = 64 * 1024
    max_streams: int = 20_000
    # Connections that are not (yet) streams: requests in progress, idle keep-alives and
    # connections still sending a head. Past it the oldest of those still sending a head or
    # body (or idle) is closed for the new one, so a flood of slow clients cannot take every
    # file descriptor, and /healthz still gets in. Both this and MAX_STREAMS are lowered at
    # start to what the process's fd limit leaves room for (see connections.fit_to_fd_limit).
    max_connections: int = 2_000
    # A request head (line and headers) must arrive within this long of the connection
    # opening, or of its first byte on a kept-alive connection: a slow-loris head, even one
    # sending a byte a minute, is closed then. Real clients send a head in one packet.
    header_timeout_seconds: float = 5.0
    # A publish body must arrive within this long of its head (408 after it): bounds a body
    # trickled a byte at a time. 4 MiB (MAX_BODY_BYTES) in 10 s needs about 3.4 Mbit/s.
    body_timeout_seconds: float = 10.0
    publish_token: str | None = None
    subscribe_secret: str | None = None
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    workers: str = "1"
    legacy_ingest: bool = False
    # One aiohttp access-log line per request (logger `aiohttp.access`). Off by default: it
    # costs about 5% of the server's CPU per published event, and a proxy in front usually
    # logs requests already; Redis failures and unhandled errors are logged either way.
    access_log: bool = False
    # Beyond the SPEC's list: per-client live queue bound (events) before a catch-up, and
    # how long per-definition duration history is kept after its last update.
    client_queue_frames: int = 1024
    # The same bound in bytes (both encodings of each frame): 1,024 frames of 60 KB would
    # hold 116 MiB per workflow for one stalled reader.
    client_queue_bytes: int = 16 * 1024 * 1024
    history_ttl_seconds: int = 30 * 86_400
    # First part of the duration history's key names (`<prefix>:hist:...`): a test session
    # gives its own, so what it records is deleted with it.
    history_prefix: str = "wfsse"
    # Replicas that must hold an append (Redis WAIT) before it is answered 201; fewer within
    # the command deadline: 503 outcome-unknown, so the publisher retries with the same
    # idempotency key. 0: answered once the primary has it (replication is asynchronous).
    min_replicas_ack: int = 0
    demo: bool = False
    # The demo engine's speed: 0.05 runs its 30 nodes in a few seconds.
    demo_time_scale: float = 1.0

    def __post_init__(self) -> None:
        positive = (
            "port",
            "heartbeat_seconds",
            "retry_ms",
            "history_maxlen",
            "retention_seconds",
            "max_body_bytes",
            "max_event_bytes",
            "max_streams",
            "max_connections",
            "header_timeout_seconds",
            "body_timeout_seconds",
            "client_queue_frames",
            "client_queue_bytes",
            "history_ttl_seconds",
            "demo_time_scale",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.upper()} must be positive, got {getattr(self, name)}")
        if not _PREFIX.fullmatch(self.history_prefix):
            # A brace would move the history's keys out of the hash tags that keep each of
            # its scripts on one Cluster slot; a colon or space would blur the key scheme.
            raise ValueError(
                "HISTORY_PREFIX must be 1 to 64 characters of A-Z a-z 0-9 . _ -, "
                f"got {self.history_prefix!r}"
            )
        if self.min_replicas_ack < 0:
            raise ValueError(f"MIN_REPLICAS_ACK must be 0 or more, got {self.min_replicas_ack}")
        if self.min_replicas_ack and not self.redis_url:
            raise ValueError("MIN_REPLICAS_ACK needs REDIS_URL: the embedded Redis has no replicas")
        if self.redis_url:
            _check_redis_url(self.redis_url)
        if self.workers != "auto" and not (self.workers.isdigit() and int(self.workers) >= 1):
            raise ValueError(f"WORKERS must be a positive integer or 'auto', got {self.workers!r}")


def _check_redis_url(url: str) -> None:
    """A REDIS_URL this server can open, or ValueError with a sentence (before any I/O)."""
    from server.redis_client import SCHEMES, SENTINEL_SCHEMES, parse_sentinel_url

    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme not in SCHEMES:
        raise ValueError(
            f"REDIS_URL must start with one of {', '.join(s + '://' for s in sorted(SCHEMES))}"
        )
    if scheme in SENTINEL_SCHEMES:
        parse_sentinel_url(url)


_BOOL_TRUE = {"1", "true", "yes", "on"}
_BOOL_FALSE = {"0", "false", "no", "off", ""}


def _convert(name: str, kind: Any, raw: str) -> Any:
    if kind in ("int", int):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name.upper()} must be an integer, got {raw!r}") from None
    if kind in ("float", float):
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{name.upper()} must be a number, got {raw!r}") from None
    if kind in ("bool", bool):
        low = raw.strip().lower()
        if low in _BOOL_TRUE:
            return True
        if low in _BOOL_FALSE:
            return False
        raise ValueError(f"{name.upper()} must be 0 or 1, got {raw!r}")
    if kind in ("tuple[str, ...]",):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if kind in ("str | None",):
        return raw or None
    return raw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting: `--retry-ms` for RETRY_MS."""
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(
                flag,
                dest=f.name,
                nargs="?",
                const="1",
                default=None,
                metavar="0|1",
                help=f"env {f.name.upper()}",
            )
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=f"env {f.name.upper()}")


def from_sources(env: Mapping[str, str], flags: Mapping[str, Any] | None = None) -> Settings:
    """Build Settings: a flag wins over the environment variable, which wins over the default."""
    values: dict[str, Any] = {}
    flags = flags or {}
    for f in fields(Settings):
        raw = flags.get(f.name)
        if raw is None:
            raw = env.get(f.name.upper())
        if raw is None:
            continue
        values[f.name] = _convert(f.name, f.type, str(raw))
    return Settings(**values)


def parse(argv: Sequence[str] | None = None) -> Settings:
    """Settings from `os.environ` and `argv`: the one place the environment is read."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(argv)
    return from_sources(os.environ, vars(ns))
