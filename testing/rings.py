"""A channel's live ring without Redis or sockets: what readers take, share and lose."""

from __future__ import annotations

from typing import Any, cast

import fakeredis

from server.fanout.hub import Hub
from server.fanout.ring import Channel, Subscription


def ring(limit: int) -> tuple[Hub, Channel]:
    """A hub (for its overflow count) and one channel of it holding `limit` events."""
    hub = Hub(fakeredis.FakeAsyncRedis(), queue_limit=limit)
    return hub, Channel("wf", cast(Any, None), hub, limit)


def reader(chan: Channel) -> Subscription:
    """A stream's place in `chan`, from its newest frame on."""
    sub = Subscription("wf", chan, chan.seq)
    chan.subs.add(sub)
    return sub
