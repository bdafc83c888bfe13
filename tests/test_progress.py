"""The progress fold, the ETA estimator and the shown snapshot: pure, clock passed in."""

from __future__ import annotations

import itertools
import json
import math
import time
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from server import progress, wire
from server.models import Event, event_adapter
from server.progress import estimate
from server.progress.fold import FoldState
from server.progress.history import EMPTY, HistoryView, MemoryHistory
from server.progress.snapshot import Shown

T0 = datetime(2026, 1, 22, 10, 28, tzinfo=UTC)
E0 = T0.timestamp()
SPEC_KEYS = wire.keys(wire.Progress)  # checked against the SPEC's list in test_metrics_openapi


def ev(at: float, event_type: str, **fields: Any) -> Event:
    """An event `at` seconds after T0, validated like the server does."""
    raw = {"event_type": event_type, "workflow_id": "wf", **fields}
    return event_adapter.validate_python({**raw, "timestamp": T0 + timedelta(seconds=at)})


def plan(*nodes: str | tuple[str, list[str]], at: float = 0.0, **kw: Any) -> Event:
    """A workflow_planned of `nodes` (id, or (id, depends_on)), type "t" for all."""
    specs = []
    for n in nodes:
        node_id, deps = (n, None) if isinstance(n, str) else n
        specs.append({"node_id": node_id, "node_type": "t", "depends_on": deps})
    return ev(at, "workflow_planned", nodes=specs, **kw)


def run(*events: Event) -> FoldState:
    state = progress.new_state()
    for e in events:
        progress.fold(state, e)
    return state


def started(at: float, node: str) -> Event:
    return ev(at, "node_started", node_id=node)


def completed(at: float, node: str, **kw: Any) -> Event:
    return ev(at, "node_completed", node_id=node, **kw)


def state_to(at: float, to_state: str) -> Event:
    return ev(at, "workflow_state_changed", to_state=to_state)


def view_with(durations: dict[str, list[float]], definition: str = "def") -> HistoryView:
    memory = MemoryHistory()
    for node, values in durations.items():
        memory.record((definition, node, "t", d) for d in values)
    return memory.view(definition, list(durations), ["t"])


def snap(
    state: FoldState, now: float, history: HistoryView = EMPTY, shown: Shown | None = None
) -> tuple[dict[str, Any], Shown]:
    out, new = progress.snapshot(
        state, workflow_id="wf", last_event_id="1-0", history=history, now=E0 + now, shown=shown
    )
    return cast("dict[str, Any]", out), new  # the tests index it with any key


# ------------------------------------------------------------------------- the fold


@pytest.mark.parametrize(
    ("events", "status", "attempts", "counts"),
    [
        pytest.param([], "pending", 0, (0, 0, 0, 0), id="planned only"),
        pytest.param([started(1, "a")], "running", 1, (0, 0, 0, 1), id="started"),
        pytest.param(
            [started(1, "a"), ev(2, "node_progress", node_id="a", fraction=0.5)],
            "running",
            1,
            (0, 0, 0, 1),
            id="progress while running",
        ),
        pytest.param(
            [ev(2, "node_progress", node_id="a", fraction=0.5)],
            "running",
            1,
            (0, 0, 0, 1),
            id="progress marks a pending node running",
        ),
        pytest.param(
            [started(1, "a"), completed(3, "a")], "completed", 1, (1, 0, 0, 0), id="completed"
        ),
        pytest.param(
            [started(1, "a"), ev(3, "node_failed", node_id="a", error="x")],
            "failed",
            1,
            (0, 1, 0, 0),
            id="failed",
        ),
        pytest.param(
            [started(1, "a"), ev(3, "node_failed", node_id="a", error="x"), started(4, "a")],
            "running",
            2,
            (0, 0, 0, 1),
            id="retry after failure",
        ),
        pytest.param(
            [
                started(1, "a"),
                ev(3, "node_failed", node_id="a", error="x"),
                started(4, "a"),
                completed(6, "a"),
            ],
            "completed",
            2,
            (1, 0, 0, 0),
            id="retry then success",
        ),
        pytest.param(
            [ev(1, "node_skipped", node_id="a")], "skipped", 0, (0, 0, 1, 0), id="skipped"
        ),
        pytest.param(
            [started(1, "a"), started(2, "a")],
            "running",
            1,
            (0, 0, 0, 1),
            id="duplicate start ignored",
        ),
        pytest.param(
            [completed(3, "a"), completed(4, "a")],
            "completed",
            1,
            (1, 0, 0, 0),
            id="duplicate completion",
        ),
    ],
)
def test_fold_node_events(
    events: list[Event], status: str, attempts: int, counts: tuple[int, int, int, int]
) -> None:
    state = run(plan("a", "b"), *events)
    node = state.nodes["a"]
    assert (node.status, node.attempts) == (status, attempts)
    c = state.counts
    assert (c["completed"], c["failed"], c["skipped"], c["running"]) == counts
    assert state.total == 2
    assert list(state.running) == (["a"] if status == "running" else [])


def test_plan_sets_totals_definition_and_concurrency() -> None:
    state = run(plan("a", ("b", ["a"]), definition_id="d", max_concurrency=3))
    assert (state.plan_known, state.total, state.definition_id) == (True, 2, "d")
    assert state.max_concurrency == 3 and state.has_deps
    assert state.started_us is None  # a plan does not start the clock


def test_without_plan_total_counts_nodes_seen() -> None:
    state = run(started(1, "a"), started(2, "b"), completed(3, "a"))
    assert (state.plan_known, state.total, state.counts["completed"]) == (False, 2, 1)
    out, _ = snap(state, 4)
    assert out["total_known"] is False
    assert out["percentage"] == 50.0


def test_out_of_plan_node_runs_but_does_not_count() -> None:
    state = run(plan("a"), started(1, "extra"), started(2, "a"))
    assert state.total == 1
    assert state.counts["running"] == 1
    out, _ = snap(state, 3)
    assert [r["node_id"] for r in out["running"]] == ["extra", "a"]
    assert out["running_nodes"] == 2
    progress.fold(state, completed(4, "extra"))
    out, _ = snap(state, 5)
    assert (out["completed_nodes"], out["percentage"]) == (0, 0.0)


def test_plan_after_nodes_recounts_and_drops_nodes_no_longer_planned() -> None:
    state = run(started(1, "a"), started(2, "x"), plan("a", "b", at=3))
    assert state.total == 2  # "x" is out of plan now
    assert state.counts["running"] == 1
    state = run(plan("a", "b"), plan("a", "c", at=1))
    assert set(state.nodes) == {"a", "c"}
    assert state.plan_version == 2


def test_identical_plan_sent_again_changes_nothing() -> None:
    state = run(plan("a", ("b", ["a"])), plan("a", ("b", ["a"]), at=5))
    assert state.plan_version == 1


def test_started_at_is_the_first_sign_of_work() -> None:
    assert run(plan("a"), state_to(2, "PENDING")).started_us is None
    assert run(plan("a"), state_to(2, "RUNNING"), started(3, "a")).started_us == round(
        (E0 + 2) * 1e6
    )
    assert run(plan("a"), started(3, "a")).started_us == round((E0 + 3) * 1e6)


def test_terminal_then_resume() -> None:
    state = run(
        plan("a", "b"),
        state_to(0, "RUNNING"),
        started(1, "a"),
        completed(5, "a"),
        state_to(10, "FAILED"),
    )
    out, _ = snap(state, 100)
    assert (out["state"], out["elapsed_seconds"], out["estimated_remaining_seconds"]) == (
        "FAILED",
        10.0,
        0.0,
    )
    assert (out["percentage"], out["time_percentage"]) == (50.0, 100.0)
    progress.fold(state, state_to(20, "RUNNING"))
    assert state.ended_us is None
    out, _ = snap(state, 25)
    assert out["elapsed_seconds"] == 25.0
    assert out["estimated_remaining_seconds"] >= 0.1


def test_history_items_are_listed_once_at_the_end() -> None:
    state = run(
        plan("a", "b", definition_id="d"), started(0, "a"), completed(2, "a"), started(2, "b")
    )
    assert progress.history_items(state, completed(4, "b")) == []
    progress.fold(state, completed(4, "b"))
    end = state_to(4, "COMPLETED")
    items = progress.history_items(state, end)
    assert sorted(items) == [("d", "a", "t", 2.0), ("d", "b", "t", 2.0)]
    progress.fold(state, end)
    # Resumed and ended again: only what was done since.
    progress.fold(state, state_to(5, "RUNNING"))
    progress.fold(state, ev(5, "node_started", node_id="c", node_type="u"))
    progress.fold(state, completed(8, "c", duration_ms=2500))
    assert progress.history_items(state, state_to(9, "CANCELLED")) == [("d", "c", "u", 2.5)]


def test_duration_prefers_duration_ms_else_start_to_end() -> None:
    state = run(
        plan("a", "b"),
        started(1, "a"),
        completed(4, "a", duration_ms=1500),
        started(1, "b"),
        completed(4.5, "b"),
    )
    assert state.nodes["a"].duration_us == 1_500_000
    assert state.nodes["b"].duration_us == 3_500_000


def test_state_round_trips_exactly_and_compactly() -> None:
    state = run(
        plan("a", ("품질 판정", ["a"]), definition_id="d", max_concurrency=2),
        state_to(0, "RUNNING"),
        started(1, "a"),
        completed(2, "a"),
        started(3, "품질 판정"),
        ev(4, "node_failed", node_id="품질 판정", error="x"),
        started(5, "extra"),
    )
    data = progress.dumps_state(state)
    assert "품질 판정".encode() in data and b"\\u" not in data
    assert progress.loads_state(data) == state
    assert progress.loads_state(progress.dumps_state(progress.new_state())) == progress.new_state()


def test_loads_state_rejects_other_data() -> None:
    with pytest.raises(ValueError, match="version"):
        progress.loads_state(b'{"v": 99}')


def test_history_keys_name_every_node_and_type() -> None:
    state = run(
        plan("a", "b", definition_id="d"), ev(1, "node_started", node_id="x", node_type="other")
    )
    assert progress.history_keys(state) == ("d", ["a", "b", "x"], ["t", "other"])


def test_fold_is_constant_time_per_node_event() -> None:
    nodes = [f"n{i}" for i in range(10_000)]
    big = run(plan(*nodes))
    started_at = time.perf_counter()
    for i, n in enumerate(nodes[:5_000]):
        progress.fold(big, started(i, n))
        progress.fold(big, completed(i + 0.5, n))
    elapsed = time.perf_counter() - started_at
    assert big.counts["completed"] == 5_000
    assert elapsed < 5.0  # O(nodes) per event would be 10^8 steps


# --------------------------------------------------------------- the estimator


def test_no_estimate_before_any_basis() -> None:
    state = run(plan("a", "b"), state_to(0, "RUNNING"), started(0, "a"))
    assert progress.eta(state, EMPTY, E0 + 5) is None
    out, _ = snap(state, 5)
    assert out["estimated_remaining_seconds"] is None
    assert out["estimated_completion_at"] is None
    assert out["time_percentage"] is None


def test_history_alone_is_a_basis() -> None:
    state = run(plan("a", ("b", ["a"]), definition_id="def"), state_to(0, "RUNNING"))
    history = view_with({"a": [10.0] * 5, "b": [20.0] * 5})
    remaining = progress.eta(state, history, E0)
    assert remaining is not None
    assert 25 < remaining < 35


def test_a_finished_node_of_this_run_is_a_basis() -> None:
    state = run(
        plan("a", "b", "c", max_concurrency=1),
        state_to(0, "RUNNING"),
        started(0, "a"),
        completed(10, "a"),
    )
    remaining = progress.eta(state, EMPTY, E0 + 10)
    assert remaining is not None
    assert 12 < remaining < 30


def test_zero_when_terminal() -> None:
    for end in ("COMPLETED", "FAILED", "CANCELLED"):
        state = run(plan("a"), started(0, "a"), state_to(1, end))
        assert progress.eta(state, EMPTY, E0 + 2) == 0.0


def test_overdue_node_still_has_time_left() -> None:
    state = run(plan("a", definition_id="def"), state_to(0, "RUNNING"), started(0, "a"))
    history = view_with({"a": [1.0, 1.2, 0.9]})
    for ran in (0.5, 10.0, 1e4, 1e7):
        remaining = progress.eta(state, history, E0 + ran)
        assert remaining is not None and math.isfinite(remaining)
        assert remaining >= 0.1
    out, _ = snap(state, 1e6, history)
    assert out["estimated_remaining_seconds"] >= 0.1


def test_at_least_a_tenth_when_everything_is_done_but_the_run_is_not() -> None:
    state = run(plan("a"), state_to(0, "RUNNING"), started(0, "a"), completed(3, "a"))
    assert progress.eta(state, EMPTY, E0 + 3) == 0.1


@pytest.mark.parametrize(
    ("mu", "var", "ran"),
    [(0.0, 0.25, 0.0), (0.0, 0.25, 0.5), (0.0, 0.25, 5.0), (2.0, 1.0, 1e5), (0.0, 0.01, 1e9)],
)
def test_expected_remaining_is_positive_and_exact_at_start(
    mu: float, var: float, ran: float
) -> None:
    left = progress.expected_remaining(mu, var, ran)
    assert left > 0 and math.isfinite(left)
    if ran == 0.0:
        assert left == pytest.approx(math.exp(mu + var / 2))


def test_concurrency_limit_and_critical_path() -> None:
    history = view_with({n: [10.0] * 20 for n in "abcd"})
    serial = run(plan("a", "b", "c", "d", definition_id="def", max_concurrency=1))
    wide = run(plan("a", "b", "c", "d", definition_id="def", max_concurrency=4))
    chain = run(plan("a", ("b", ["a"]), ("c", ["b"]), ("d", ["c"]), definition_id="def"))
    fan = run(plan("a", ("b", ["a"]), ("c", ["a"]), ("d", ["a"]), definition_id="def"))
    s, w, c, f = (progress.eta(x, history, E0) or 0.0 for x in (serial, wide, chain, fan))
    assert 35 < s < 45 and 8 < w < 12
    assert 35 < c < 45 and 17 < f < 23


def test_without_dependencies_the_observed_parallelism_is_used() -> None:
    nodes = [f"n{i}" for i in range(8)]
    work = [
        state_to(0, "RUNNING"),
        started(0, "n0"),
        started(0, "n1"),
        completed(10, "n0"),
        completed(10, "n1"),
    ]
    state = run(plan(*nodes), *work)
    remaining = progress.eta(state, EMPTY, E0 + 10)
    assert remaining is not None
    # Six nodes of about 10 s, two at a time (two finished nodes leave a wide spread).
    assert 25 < remaining < 45
    as_planned = {
        c: progress.eta(run(plan(*nodes, max_concurrency=c), *work), EMPTY, E0 + 10)
        for c in (1, 2, 6)
    }
    assert remaining == as_planned[2]
    assert (as_planned[6] or 0.0) < remaining < 0.7 * (as_planned[1] or 0.0)


def test_a_slow_run_stays_slow() -> None:
    history = view_with({n: [10.0] * 10 for n in "abcdefgh"})
    base = [plan(*"abcdefgh", definition_id="def", max_concurrency=1), state_to(0, "RUNNING")]
    on_time = run(*base, started(0, "a"), completed(10, "a"), started(10, "b"), completed(20, "b"))
    slow = run(*base, started(0, "a"), completed(20, "a"), started(20, "b"), completed(40, "b"))
    normal = progress.eta(on_time, history, E0 + 20) or 0.0
    slower = progress.eta(slow, history, E0 + 40) or 0.0
    assert 55 < normal < 65
    assert slower > 1.4 * normal


def test_failed_node_is_expected_to_run_again() -> None:
    history = view_with({"a": [10.0] * 10, "b": [10.0] * 10})
    state = run(
        plan("a", ("b", ["a"]), definition_id="def"),
        state_to(0, "RUNNING"),
        started(0, "a"),
        ev(5, "node_failed", node_id="a", error="x"),
    )
    remaining = progress.eta(state, history, E0 + 5)
    assert remaining is not None and 17 < remaining < 23


def test_eta_is_deterministic_and_survives_serialisation() -> None:
    history = view_with({n: [5.0, 10.0, 20.0] for n in "abcdef"})
    state = run(
        plan(
            "a",
            ("b", ["a"]),
            ("c", ["a"]),
            ("d", ["a"]),
            ("e", ["b", "c"]),
            "f",
            definition_id="def",
            max_concurrency=2,
        ),
        state_to(0, "RUNNING"),
        started(0, "a"),
        started(0, "f"),
        completed(8, "a"),
        started(8, "b"),
    )
    first = progress.eta(state, history, E0 + 12)
    assert first is not None
    assert progress.eta(state, history, E0 + 12) == first
    copy = progress.loads_state(progress.dumps_state(state))
    assert progress.eta(copy, history, E0 + 12) == first


def test_estimate_moves_smoothly_between_events() -> None:
    history = view_with({n: [5.0, 10.0, 20.0] for n in "abcd"})
    state = run(
        plan(*"abcd", definition_id="def", max_concurrency=2),
        state_to(0, "RUNNING"),
        started(0, "a"),
        started(0, "b"),
    )
    before = [progress.eta(state, history, E0 + t / 10) or 0.0 for t in range(10, 200)]
    for x, y in itertools.pairwise(before):
        assert abs(y - x) < 0.5  # 0.1 s apart: no jumps from resampling


def test_parallel_branches_end_later_than_their_medians() -> None:
    durations = [4.0, 6.0, 10.0, 16.0, 25.0]  # median 10 s, a log-sd of about 0.7
    history = view_with({n: durations for n in "abcdefgh"})
    one = run(plan("a", definition_id="def"), state_to(0, "RUNNING"))
    eight = run(plan(*"abcdefgh", definition_id="def", max_concurrency=8), state_to(0, "RUNNING"))
    single = progress.eta(one, history, E0) or 0.0
    widest = progress.eta(eight, history, E0) or 0.0
    # One node: under its 10 s median, since the answer minimises the error relative to
    # the total and short totals weigh more; eight: the latest of eight, beyond 10 s.
    assert 3 < single < 10
    assert widest > 12 and widest > 2.5 * single


def test_speed_factor_ignores_noise_and_follows_a_clear_departure() -> None:
    noise = [(0.05 * (-1) ** i, 0.25) for i in range(9)] + [(0.1, 0.25)]
    mean, var = estimate._speed(noise, [])
    assert abs(mean) < 0.01 and var < 0.01
    slow = [(0.4 + 0.05 * (-1) ** i, 0.25) for i in range(20)]
    mean, var = estimate._speed(slow, [])
    assert 0.3 < mean < 0.41 and var < 0.02
    none_yet, doubt = estimate._speed([], [])
    assert none_yet == 0.0 and doubt > 0.0


def test_running_nodes_count_as_lower_bounds_of_the_speed() -> None:
    finished = [(0.0, 0.25)] * 4
    base, _ = estimate._speed(finished, [])
    overdue, _ = estimate._speed(finished, [(0.8, 0.25)] * 4)  # each ran 2.2x its median
    assert overdue > base + 0.05
    early, _ = estimate._speed(finished, [(-3.0, 0.25)] * 4)  # each just started
    assert early == pytest.approx(base, abs=0.01)


@pytest.mark.parametrize(
    ("mu", "var", "ran"), [(2.0, 0.25, 0.0), (2.0, 0.25, 5.0), (2.0, 0.25, 1e3), (0.0, 0.01, 1e9)]
)
def test_time_left_of_a_running_node_grows_with_its_quantile(
    mu: float, var: float, ran: float
) -> None:
    lefts = [estimate._left_of_running(mu, var, ran, (k + 0.5) / 16) for k in range(16)]
    assert all(math.isfinite(x) and x >= 0.0 for x in lefts)
    assert lefts == sorted(lefts) and lefts[-1] > lefts[0]


def test_weighted_median() -> None:
    assert estimate._weighted_median([3.0, 1.0, 2.0], [1.0, 1.0, 1.0]) == 2.0
    assert estimate._weighted_median([1.0, 2.0, 3.0, 4.0], [1.0] * 4) == 2.5
    assert 1.0 < estimate._weighted_median([1.0, 2.0, 3.0], [10.0, 1.0, 1.0]) < 1.5
    assert estimate._weighted_median([1.0, 2.0, 3.0], [100.0, 1.0, 1.0]) < 1.05
    assert estimate._weighted_median([5.0], [2.0]) == 5.0


def test_big_plans_simulate_fewer_futures() -> None:
    small = run(plan(*[f"n{i}" for i in range(40)]))
    big = run(plan(*[f"n{i}" for i in range(1000)]))
    huge = run(plan(*[f"n{i}" for i in range(10_000)]))
    assert estimate._samples(small) == estimate.MC_SAMPLES
    assert estimate._samples(big) * 1000 <= estimate.MC_BUDGET
    assert estimate._samples(huge) == estimate.MC_MIN_SAMPLES


# ------------------------------------------------------------------ the snapshot


def test_snapshot_has_every_key_and_spec_formats() -> None:
    history = view_with({"a": [60.0] * 5, "b": [60.0] * 5, "c": [60.0] * 5})
    state = run(
        plan("a", "b", "c", definition_id="def"),
        state_to(0, "RUNNING"),
        ev(1, "node_started", node_id="b", node_name="이상 탐지"),
        started(2, "a"),
        started(3, "c"),
        completed(4, "c"),
    )
    out, shown = snap(state, 10.04, history)
    assert set(out) == SPEC_KEYS
    assert list(out) == list(wire.Progress.__annotations__)  # the order on the wire
    assert json.loads(json.dumps(out)) == out
    assert out["running"] == [
        {"node_id": "b", "node_name": "이상 탐지", "started_at": "2026-01-22T10:28:01Z"},
        {"node_id": "a", "node_name": None, "started_at": "2026-01-22T10:28:02Z"},
    ]
    assert out["current_node"] == "a"
    assert (out["total_nodes"], out["completed_nodes"], out["running_nodes"]) == (3, 1, 2)
    assert out["percentage"] == 33.3
    assert out["started_at"] == "2026-01-22T10:28:00Z"
    assert out["updated_at"] == "2026-01-22T10:28:04Z"
    assert out["elapsed_seconds"] == 10.0
    assert out["last_event_id"] == "1-0"
    remaining = out["estimated_remaining_seconds"]
    assert remaining == round(remaining, 1) and remaining > 0
    completion = datetime.fromisoformat(out["estimated_completion_at"].replace("Z", "+00:00"))
    assert completion.timestamp() == pytest.approx(E0 + 10.04 + remaining, abs=0.001)
    assert out["time_percentage"] == round(100 * 10.0 / (10.0 + remaining), 1)
    assert progress.loads_shown(progress.dumps_shown(shown)) == shown


def test_percentage_is_100_when_completed_and_zero_without_nodes() -> None:
    out, _ = snap(run(state_to(0, "RUNNING")), 1)
    assert (out["percentage"], out["total_nodes"], out["current_node"]) == (0.0, 0, None)
    out, _ = snap(
        run(plan("a", "b"), started(0, "a"), completed(1, "a"), state_to(2, "COMPLETED")), 3
    )
    assert (out["percentage"], out["time_percentage"]) == (100.0, 100.0)
    assert out["estimated_remaining_seconds"] == 0.0
    assert out["elapsed_seconds"] == 2.0


@pytest.mark.parametrize("terminal", ["FAILED", "CANCELLED"])
def test_a_run_that_ends_otherwise_has_no_time_left_but_keeps_its_count(terminal: str) -> None:
    out, _ = snap(run(plan("a", "b"), started(0, "a"), completed(1, "a"), state_to(2, terminal)), 3)
    assert (out["state"], out["percentage"], out["time_percentage"]) == (terminal, 50.0, 100.0)
    assert out["estimated_remaining_seconds"] == 0.0 and out["elapsed_seconds"] == 2.0


def test_percentages_never_go_back_while_the_plan_is_unchanged() -> None:
    history = view_with({n: [10.0] * 5 for n in "abcd"})
    events = [
        plan(*"abcd", definition_id="def", max_concurrency=1),
        state_to(0, "RUNNING"),
        started(0, "a"),
        completed(10, "a"),
        started(10, "b"),
        completed(60, "b"),
        started(60, "a"),  # a completed node runs again: its count drops
        completed(70, "a"),
        started(70, "c"),
        ev(75, "node_failed", node_id="c", error="x"),
        started(76, "c"),
        completed(90, "c"),
        started(90, "d"),
    ]
    state = progress.new_state()
    shown: Shown | None = None
    last_pct, last_time = 0.0, 0.0
    for e in events:
        progress.fold(state, e)
        for dt in (0.0, 0.5, 5.0, 30.0):
            at = (e.timestamp or T0).timestamp() - E0 + dt
            out, shown = snap(state, at, history, shown)
            assert out["percentage"] >= last_pct
            if out["time_percentage"] is not None:
                assert out["time_percentage"] >= last_time
                assert out["time_percentage"] < 100.0
                last_time = out["time_percentage"]
            assert out["estimated_remaining_seconds"] is None or (
                out["estimated_remaining_seconds"] >= 0.1
            )
            last_pct = out["percentage"]
    assert last_pct == 75.0


def test_a_changed_plan_may_lower_the_percentage() -> None:
    state = run(plan("a", "b"), started(0, "a"), completed(1, "a"))
    out, shown = snap(state, 2)
    assert out["percentage"] == 50.0
    progress.fold(state, plan("a", "b", "c", "d", at=3))
    out, _ = snap(state, 4, shown=shown)
    assert out["percentage"] == 25.0


def test_shown_estimate_is_smoothed_toward_the_new_one() -> None:
    history = view_with({"a": [100.0] * 10, "b": [100.0] * 10})
    state = run(
        plan("a", "b", definition_id="def", max_concurrency=1),
        state_to(0, "RUNNING"),
        started(0, "a"),
    )
    first, shown = snap(state, 1, history)
    # Nothing to smooth yet: the raw estimate, a little under 2 x 100 s (see eta()).
    assert first["estimated_remaining_seconds"] == pytest.approx(
        progress.eta(state, history, E0 + 1) or 0.0, abs=0.1
    )
    assert 170 < first["estimated_remaining_seconds"] < 210
    # "a" finishes far earlier than expected: the raw estimate drops by ~95 s at once.
    progress.fold(state, completed(5, "a"))
    progress.fold(state, started(5, "b"))
    raw = progress.eta(state, history, E0 + 5.5) or 0.0
    soon, _ = snap(state, 5.5, history, shown)
    assert raw < soon["estimated_remaining_seconds"] < first["estimated_remaining_seconds"] - 4
    later, _ = snap(state, 60, history, shown)  # long after: caught up
    assert later["estimated_remaining_seconds"] == pytest.approx(
        progress.eta(state, history, E0 + 60) or 0.0, abs=0.2
    )


def test_shown_estimate_never_sticks_at_zero_when_overdue() -> None:
    history = view_with({"a": [10.0] * 10})
    state = run(plan("a", definition_id="def"), state_to(0, "RUNNING"), started(0, "a"))
    shown: Shown | None = None
    for at in range(0, 200, 5):
        out, shown = snap(state, at, history, shown)
        assert out["estimated_remaining_seconds"] >= 0.1
    assert out["estimated_remaining_seconds"] > 1.0  # an overdue node still shows real time
