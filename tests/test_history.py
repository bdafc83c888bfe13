"""Duration history: Welford stats in Redis, on fakeredis and on the real server."""

from __future__ import annotations

import asyncio
import hashlib
import math
import statistics
from collections.abc import AsyncIterator
from typing import Any

import pytest

from server import redis_keys
from server.progress import history
from server.progress.history import MemoryHistory, Stats
from tests.conftest import prefixed_redis


@pytest.fixture(params=["fakeredis", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, str]]:
    """(client, unique key prefix); every key under the prefix is deleted afterwards."""
    async with prefixed_redis(request.param) as pair:
        yield pair


def test_add_is_welford_over_log_durations() -> None:
    durations = [1.0, 2.5, 4.0, 0.5, 10.0]
    stats: Stats | None = None
    for d in durations:
        stats = history.add(stats, math.log(d))
    logs = [math.log(d) for d in durations]
    assert stats is not None
    assert stats.count == 5
    assert stats.mean_log == pytest.approx(statistics.fmean(logs))
    assert stats.var_log == pytest.approx(statistics.variance(logs))


def test_add_caps_the_count_so_old_runs_fade() -> None:
    stats: Stats | None = None
    for _ in range(history.MAX_COUNT + 50):
        stats = history.add(stats, 0.0)
    for _ in range(history.MAX_COUNT):
        stats = history.add(stats, 1.0)
    assert stats is not None
    assert stats.count == history.MAX_COUNT
    assert stats.mean_log > 0.6  # uncapped it would still be 0.4


def test_zero_duration_is_clamped_not_minus_infinity() -> None:
    assert history.log_seconds(0.0) == math.log(history.MIN_SECONDS)


def test_definition_key_hashes_the_client_string() -> None:
    hostile = "a:{b}*?[x]\n한"
    key = redis_keys.history_definition_key(hostile, prefix="p")
    assert key == "p:hist:def:" + hashlib.sha256(hostile.encode()).hexdigest()
    assert redis_keys.history_types_key(prefix="p") == "p:hist:types"


def test_view_answers_only_for_its_definition() -> None:
    memory = MemoryHistory()
    memory.record([("def-a", "n1", "fetch", 2.0)])
    view = memory.view("def-a", ["n1", "n2"], ["fetch", "other"])
    assert view.for_node("def-a", "n1") is not None
    assert view.for_node("def-b", "n1") is None
    assert view.for_node("def-a", "n2") is None
    assert view.for_node(None, "n1") is None
    assert view.for_type("fetch") is not None
    assert view.for_type(None) is None
    assert view.for_type("other") is None


async def test_record_then_load_matches_the_in_memory_arithmetic(store: tuple[Any, str]) -> None:
    client, prefix = store
    items: list[tuple[str | None, str, str | None, float]] = [
        ("def-1", "n1", "fetch", 2.0),
        ("def-1", "n2", "train", 40.0),
        ("def-1", "n1", "fetch", 3.0),
        ("def-2", "n1", "fetch", 5.0),
        (None, "x", "train", 50.0),
        ("def-1", "품질 판정", None, 7.0),
    ]
    await history.record(client, items[:3], ttl_seconds=60, prefix=prefix)
    await history.record(client, items[3:], ttl_seconds=60, prefix=prefix)
    memory = MemoryHistory()
    memory.record(items)
    ids = ["n1", "n2", "품질 판정", "missing"]
    loaded = await history.load(client, "def-1", ids, ["fetch", "train", "nope"], prefix=prefix)
    expected = memory.view("def-1", ids, ["fetch", "train", "nope"])
    assert loaded.nodes.keys() == expected.nodes.keys() == {"n1", "n2", "품질 판정"}
    assert loaded.types.keys() == expected.types.keys() == {"fetch", "train"}
    for name, stats in expected.nodes.items():
        got = loaded.nodes[name]
        assert got.count == stats.count
        assert got.mean_log == pytest.approx(stats.mean_log, rel=1e-12)
        assert got.m2_log == pytest.approx(stats.m2_log, rel=1e-12, abs=1e-15)
    assert loaded.types["fetch"].count == 3
    assert loaded.types["train"].count == 2


async def test_keys_never_contain_client_strings_and_expire(store: tuple[Any, str]) -> None:
    client, prefix = store
    hostile = "wf:{x}*\n"
    await history.record(client, [(hostile, "n", "t", 1.0)], ttl_seconds=120, prefix=prefix)
    keys = sorted([k.decode() async for k in client.scan_iter(match=f"{prefix}:*")])
    hashes = [
        redis_keys.history_definition_key(hostile, prefix=prefix),
        redis_keys.history_types_key(prefix=prefix),
    ]
    assert keys == sorted(
        hashes + [redis_keys.history_recent_key(k, prefix=prefix) for k in hashes]
    )
    for key in keys:
        assert 0 < await client.ttl(key) <= 120


async def test_concurrent_records_lose_no_update(store: tuple[Any, str]) -> None:
    client, prefix = store
    await asyncio.gather(
        *(
            history.record(client, [("d", "n", "t", float(i + 1))], ttl_seconds=60, prefix=prefix)
            for i in range(30)
        )
    )
    view = await history.load(client, "d", ["n"], ["t"], prefix=prefix)
    node = view.for_node("d", "n")
    assert node is not None and node.count == 30
    assert node.mean_log == pytest.approx(statistics.fmean(math.log(i + 1) for i in range(30)))


async def test_unreadable_stored_value_counts_as_no_history(store: tuple[Any, str]) -> None:
    client, prefix = store
    await client.hset(
        redis_keys.history_types_key(prefix=prefix), mapping={"bad": "x y", "nan": "2 nan 1"}
    )
    view = await history.load(client, None, [], ["bad", "nan"], prefix=prefix)
    assert view.empty


async def test_load_of_nothing_asks_nothing(store: tuple[Any, str]) -> None:
    client, prefix = store
    view = await history.load(client, None, ["n1"], [], prefix=prefix)
    assert view.empty


async def test_record_rejects_a_non_positive_ttl(store: tuple[Any, str]) -> None:
    client, prefix = store
    with pytest.raises(ValueError, match="ttl_seconds"):
        await history.record(client, [("d", "n", "t", 1.0)], ttl_seconds=0, prefix=prefix)
