"""The run view's DAG, timeline and usual durations in real headless Chromium, with axe-core.

As tests/test_dashboard_browser.py: Debian's Chromium under Playwright, skipped without
them except under REQUIRE_REDIS=1 (CI). axe-core is vendored in tests/assets/axe.min.js
(from the npm package axe-core, see tests/assets/README.md): nothing is downloaded here.
With DASHBOARD_SCREENSHOTS=<dir> the demo test also writes the README's pictures there.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from testing.cleanup import forget
from testing.events import DIAMOND, dag_plan, iso, timed
from testing.http import publish
from testing.procs import RestartPair, ServerProcess
from testing.sse import collect
from tests.conftest import REDIS_URL, real_redis_or_skip
from tests.test_dashboard_browser import DESKTOP, PHONE, WAIT_MS, badge_is, open_page

AXE = Path(__file__).parent / "assets" / "axe.min.js"
SCREENSHOTS = os.environ.get("DASHBOARD_SCREENSHOTS")

pytestmark = pytest.mark.timeout(240)


def eta_seconds(text: str) -> float:
    """The seconds of "about 1 min 5 s left" (0.5 for "almost done")."""
    if text == "almost done":
        return 0.5
    m = re.fullmatch(r"about (.+) left", text)
    assert m, text
    total = 0.0
    for value, unit in re.findall(r"([\d.]+) (h|min|s)", m.group(1)):
        total += float(value) * {"h": 3600, "min": 60, "s": 1}[unit]
    return total


READ_EDGE = """() => {
  const svg = document.querySelector('svg.timeline');
  const bars = [...svg.querySelectorAll('.bar.rest, .bar.pending')];
  const right = Math.max(...bars.map(b => Number(b.getAttribute('x')) + Number(b.getAttribute('width'))));
  const eta = svg.querySelector('.eta-line');
  return {eta: document.getElementById('eta').textContent, endAt: Number(svg.dataset.endAt),
          now: Number(svg.dataset.now), x1: Number(svg.dataset.x1), right,
          etaX: eta ? Number(eta.getAttribute('x1')) : null, pending: bars.length};
}"""

EDGE_READY = """kinds => {
  const svg = document.querySelector('svg.timeline');
  return !!svg && svg.dataset.endAt !== undefined
    && document.querySelectorAll(kinds).length > 0
    && /left|almost/.test(document.getElementById('eta').textContent);
}"""


async def check_edge(page: Any, kinds: str = "svg.timeline .bar.pending") -> dict[str, Any]:
    """While the run goes: pending bars exist, and the timeline's right edge is the ETA."""
    await page.wait_for_function(EDGE_READY, arg=kinds, timeout=WAIT_MS)
    got: dict[str, Any] = await page.evaluate(READ_EDGE)
    assert got["pending"] > 0
    shown = eta_seconds(got["eta"])
    edge = (got["endAt"] - got["now"]) / 1000
    assert abs(edge - shown) <= 1.0, got  # "about 12 s left" is rounded to the second
    # The latest predicted bar ends at the chart's right edge, where the ETA line is.
    assert got["right"] == pytest.approx(got["x1"], abs=1.0), got
    assert got["etaX"] == pytest.approx(got["x1"], abs=1.0), got
    return got


async def read_dag(page: Any) -> dict[str, Any]:
    return dict(
        await page.evaluate(
            """() => ({
          nodes: [...document.querySelectorAll('svg.dag .dag-node')].map(g =>
            [g.dataset.nodeId, g.dataset.status, g.hasAttribute('data-retried'),
             g.getAttribute('aria-label')]),
          edges: [...document.querySelectorAll('svg.dag .edge')].map(p =>
            [p.dataset.from, p.dataset.to]),
        })"""
        )
    )


async def axe_audit(page: Any) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page as it is now."""
    await page.add_script_tag(path=str(AXE))
    found: list[dict[str, Any]] = await page.evaluate(
        """async () => {
      const r = await axe.run(document, {resultTypes: ['violations']});
      return r.violations.filter(v => v.impact === 'serious' || v.impact === 'critical')
        .map(v => ({id: v.id, impact: v.impact,
          nodes: v.nodes.map(n => n.target.join(' ') + ' ' + (n.any[0] || {}).message)}));
    }"""
    )
    return found


def truth(events: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, str], dict[str, int]]:
    """The plan, each node's final status and its number of starts, from the stream."""
    plan = {n["node_id"]: n for n in events[0]["nodes"]}
    final: dict[str, str] = {}
    starts: dict[str, int] = {}
    for e in events:
        if e["event_type"] in ("node_started", "node_completed", "node_failed", "node_skipped"):
            final[e["node_id"]] = (
                e["event_type"].removeprefix("node_").replace("started", "running")
            )
        if e["event_type"] == "node_started":
            starts[e["node_id"]] = starts.get(e["node_id"], 0) + 1
    return plan, final, starts


def assert_final_pictures(
    dag: dict[str, Any], plan: dict[str, Any], final: dict[str, str], starts: dict[str, int]
) -> None:
    ids = [n[0] for n in dag["nodes"]]
    assert sorted(ids) == sorted(plan) and len(ids) == len(set(ids))  # each node once
    edges = sorted(map(tuple, dag["edges"]))
    assert edges == sorted((d, n) for n in plan for d in plan[n].get("depends_on") or [])
    for node_id, status, retried, label in dag["nodes"]:
        assert status == final.get(node_id, "pending"), node_id
        assert retried == (starts.get(node_id, 0) > 1 and status != "failed"), node_id
        assert status in label  # the text equivalent says it, not only the colour


async def test_dag_and_timeline_follow_a_demo_run(browser: Any) -> None:
    scale = "1" if SCREENSHOTS else "0.4"
    srv = ServerProcess("--demo", "--demo-time-scale", scale, clean=True)
    try:
        await srv.start()
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{srv.url}/demo/workflows") as resp:
                assert resp.status == 201
                wf = (await resp.json())["workflow_id"]
        page, errors = await open_page(browser, f"{srv.url}/?workflow={wf}")
        phone, phone_errors = await open_page(browser, f"{srv.url}/?workflow={wf}", PHONE)

        first = await check_edge(page)
        await check_edge(phone)
        if SCREENSHOTS:
            await shoot(page, phone, Path(SCREENSHOTS))
        # A moment later the edge still agrees (the ETA text has moved on meanwhile).
        await page.wait_for_function(
            "t => document.getElementById('eta').textContent !== t",
            arg=first["eta"],
            timeout=WAIT_MS,
        )
        await check_edge(page, "svg.timeline .bar.pending, svg.timeline .bar.rest")
        mid = await read_dag(page)
        assert len(mid["nodes"]) == 30
        assert {s for _, s, _, _ in mid["nodes"]} & {"pending", "running"}
        assert await axe_audit(page) == []  # mid-run: pending, running, predicted bars
        assert await axe_audit(phone) == []
        await badge_is(page, "finished")
        await badge_is(phone, "finished")
        async with aiohttp.ClientSession() as session:
            msgs = await collect(session, f"{srv.url}/workflows/{wf}/events", timeout=30)
        plan, final, starts = truth([m.json() for m in msgs])
        assert set(final.values()) <= {"completed", "skipped"}
        for p in (page, phone):
            assert_final_pictures(await read_dag(p), plan, final, starts)
            left = await p.eval_on_selector_all(
                ".bar.pending, .bar.rest, .eta-line", "b => b.length"
            )
            assert left == 0  # finished: real times only
            done = await p.eval_on_selector_all(
                "svg.timeline .tl-row",
                "rs => rs.map(r => [r.dataset.nodeId,"
                " r.querySelectorAll('.bar.done').length, r.querySelectorAll('.bar.skipped').length])",
            )
            assert [r[0] for r in done] == list(plan)  # plan order, each node once
            for node_id, bars, skipped in done:
                assert (bars, skipped) == ((1, 0) if final[node_id] == "completed" else (0, 1))
        assert await axe_audit(page) == []
        if SCREENSHOTS:
            out = Path(SCREENSHOTS)
            await page.locator("#timeline-panel").screenshot(
                path=str(out / "timeline-finished.png")
            )
        assert errors == [] and phone_errors == []
    finally:
        srv.stop()


async def shoot(page: Any, phone: Any, out: Path) -> None:
    """The README's pictures, while the run is about half done."""
    out.mkdir(parents=True, exist_ok=True)
    for p in (page, phone):
        await p.wait_for_function(
            "() => Number(document.getElementById('bar').getAttribute('aria-valuenow')) >= 35",
            timeout=WAIT_MS,
        )
    await page.locator("#graph-panel").screenshot(path=str(out / "dag.png"))
    await page.locator("#timeline-panel").screenshot(path=str(out / "timeline.png"))
    await phone.locator("#graph-panel").screenshot(path=str(out / "dag-phone.png"))
    await phone.locator("#timeline-panel").screenshot(path=str(out / "timeline-phone.png"))


DEPS = DIAMOND


def planned(definition: str, ts: float, names: dict[str, str] | None = None) -> dict[str, Any]:
    return dag_plan(definition, ts, lambda n: (names or {}).get(n, f"노드 {n}"), DEPS)


ev = timed


def state(to: str, ts: float) -> dict[str, Any]:
    return {"event_type": "workflow_state_changed", "to_state": to, "timestamp": iso(ts)}


async def test_pictures_are_right_after_a_server_restart_mid_run(browser: Any) -> None:
    redis = await real_redis_or_skip()
    wf, definition = "pic-" + uuid.uuid4().hex[:12], "pic-def-" + uuid.uuid4().hex[:8]
    pair = RestartPair({"REDIS_URL": REDIS_URL}, retry_ms=500)
    other = pair.other
    ids: list[str] = []
    try:
        await pair.start()
        page, errors = await open_page(browser, f"{pair.url}/?workflow={wf}")
        await badge_is(page, "live", timeout=10_000)
        t = time.time()
        ids += await publish(
            other.url,
            wf,
            [
                planned(definition, t - 12),
                state("RUNNING", t - 12),
                ev("node_started", "a", t - 12),
                ev("node_completed", "a", t - 10),
                ev("node_started", "b", t - 10),
                ev("node_started", "c", t - 10),
            ],
        )
        await check_edge(page)

        pair.end(signal.SIGKILL)
        await badge_is(page, "reconnecting", timeout=10_000)
        t = time.time()
        ids += await publish(
            other.url,
            wf,
            [
                ev("node_completed", "b", t - 1),
                ev("node_failed", "c", t - 1, error="timeout"),
                ev("node_started", "c", t),
            ],
        )
        await pair.restart()
        await page.wait_for_function(
            "n => window.__seenIds.length === n", arg=len(ids), timeout=30_000
        )
        await check_edge(page)
        dag = await read_dag(page)
        statuses = {n: s for n, s, _, _ in dag["nodes"]}
        assert statuses == {
            "a": "completed",
            "b": "completed",
            "c": "running",
            "d": "pending",
            "e": "pending",
        }
        assert [n for n, _, r, _ in dag["nodes"] if r] == ["c"]  # retried after its failure
        for node_id in ("d", "e"):
            bars = f"svg.timeline .tl-row[data-node-id='{node_id}'] .bar.pending"
            assert await page.locator(bars).count() == 1
        assert await page.locator("svg.timeline .tl-row[data-node-id='c'] .bar.rest").count() == 1

        t = time.time()
        ids += await publish(
            other.url,
            wf,
            [
                ev("node_completed", "c", t),
                ev("node_started", "d", t),
                ev("node_completed", "d", t),
                ev("node_skipped", "e", t),
                state("COMPLETED", t),
            ],
        )
        await badge_is(page, "finished", timeout=20_000)
        assert await page.evaluate("window.__seenIds") == ids
        async with aiohttp.ClientSession() as session:
            msgs = await collect(session, f"{other.url}/workflows/{wf}/events", timeout=30)
        plan, final, starts = truth([m.json() for m in msgs])
        assert_final_pictures(await read_dag(page), plan, final, starts)
        assert await page.locator(".bar.pending, .bar.rest").count() == 0
        assert errors == []
    finally:
        pair.stop()
        await forget(redis, [wf])
        await redis.aclose()


HOSTILE = '<img src=x onerror="window.__pwned=1"><b id="boom">bold</b>'


async def test_usual_durations_overdue_keyboard_html_and_axe(browser: Any) -> None:
    """A second run of a definition: the list says "usually", a node long past its usual
    time is marked; arrow keys move between nodes; event text with markup stays text; axe
    finds nothing serious on the run view nor on the home page."""
    redis = await real_redis_or_skip()
    earlier, wf = "pic-" + uuid.uuid4().hex[:12], "pic-" + uuid.uuid4().hex[:12]
    definition = "pic-def-" + uuid.uuid4().hex[:8]
    srv = ServerProcess(env={"REDIS_URL": REDIS_URL}, clean=True)
    names = {"b": HOSTILE}
    try:
        await srv.start()
        t = time.time() - 3600
        await publish(
            srv.url,
            earlier,
            [
                planned(definition, t, names),
                state("RUNNING", t),
                ev("node_started", "a", t),
                ev("node_completed", "a", t + 2),
                ev("node_started", "b", t + 2),
                ev("node_completed", "b", t + 4),
                ev("node_started", "c", t + 2),
                ev("node_completed", "c", t + 5),
                ev("node_started", "d", t + 5),
                ev("node_completed", "d", t + 6),
                ev("node_started", "e", t + 6),
                ev("node_completed", "e", t + 7),
                state("COMPLETED", t + 7),
            ],
        )
        t = time.time()
        await publish(
            srv.url,
            wf,
            [
                planned(definition, t - 70, names),
                state("RUNNING", t - 70),
                ev("node_started", "a", t - 70),
                ev("node_completed", "a", t - 68),
                ev("node_started", "b", t - 68),  # usually 2 s: 68 s is far past it
                ev("node_started", "c", t - 68),
                ev("node_failed", "c", t - 66, error=HOSTILE),
                ev("node_started", "c", t - 1),
            ],
        )
        page, errors = await open_page(browser, f"{srv.url}/?workflow={wf}")
        await page.wait_for_selector("li.node[data-overdue]", timeout=WAIT_MS)
        usual = await page.eval_on_selector_all(
            "#nodes li",
            "lis => lis.map(li => [li.dataset.nodeId, li.hasAttribute('data-overdue'),"
            " li.querySelector('.node-usual').textContent])",
        )
        assert usual == [
            ["a", False, "usually 2.0 s"],
            ["b", True, "⚠ far past its usual 2.0 s"],
            ["c", False, "usually 3.0 s"],
            ["d", False, "usually 1.0 s"],
            ["e", False, "usually 1.0 s"],
        ]
        assert await page.get_attribute("svg.dag [data-node-id='b']", "data-overdue") == ""
        label = await page.get_attribute("svg.dag [data-node-id='b']", "aria-label") or ""
        assert label.startswith(HOSTILE + ": running") and "far past its usual time" in label

        # Markup from events is text everywhere: list, log, graph, timeline.
        assert await page.evaluate("window.__pwned") is None
        assert await page.locator("#boom, #view img, #view b").count() == 0
        assert await page.text_content("li[data-node-id='b'] .node-name") == HOSTILE
        assert HOSTILE in (await page.text_content("li[data-node-id='c'] .node-error") or "")
        assert HOSTILE in (await page.text_content("#events") or "")
        tl = await page.get_attribute("svg.timeline [data-node-id='b']", "aria-label") or ""
        assert tl.startswith(HOSTILE + ": running since")

        # Keyboard: the graph's first node is in the tab order; Down goes to a dependant,
        # Right along the layer, Enter to the node in the list, Down there to the next one.
        await page.focus("svg.dag [data-node-id='a']")
        await page.keyboard.press("ArrowDown")
        assert await page.evaluate("document.activeElement.dataset.nodeId") == "b"
        await page.keyboard.press("ArrowRight")
        assert await page.evaluate("document.activeElement.dataset.nodeId") == "c"
        await page.keyboard.press("ArrowUp")
        assert await page.evaluate("document.activeElement.dataset.nodeId") == "a"
        await page.keyboard.press("Enter")
        focused = await page.evaluate(
            "[document.activeElement.tagName, document.activeElement.dataset.nodeId]"
        )
        assert focused == ["LI", "a"]
        await page.keyboard.press("ArrowDown")
        assert await page.evaluate("document.activeElement.dataset.nodeId") == "b"
        assert await page.get_attribute("svg.dag [data-node-id='b']", "data-selected") == ""
        await page.focus("svg.timeline [data-node-id='a']")
        await page.keyboard.press("End")
        assert await page.evaluate("document.activeElement.dataset.nodeId") == "e"

        await check_edge(page)
        assert await axe_audit(page) == []
        home, home_errors = await open_page(browser, f"{srv.url}/", DESKTOP)
        await home.wait_for_selector("#wf-input")
        assert await axe_audit(home) == []
        assert errors == [] and home_errors == []
    finally:
        srv.stop()
        await forget(redis, [earlier, wf])
        await redis.aclose()
