"""The dashboard in real headless Chromium (Debian's), driven by Playwright.

Needs `apt-get install chromium fonts-noto-cjk` and `pip install playwright` (never
`playwright install`: the browser is Debian's). Skipped when either is missing, except under
REQUIRE_REDIS=1 (CI), where that fails. With DASHBOARD_SCREENSHOTS=<dir> the first test
runs slower and writes the README's screenshots there.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server import redis_keys
from testing.events import short_run
from testing.http import publish
from testing.procs import RestartPair, ServerProcess
from testing.sse import collect
from tests.conftest import REDIS_URL, real_redis_or_skip

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
SCREENSHOTS = os.environ.get("DASHBOARD_SCREENSHOTS")
WAIT_MS = 60_000  # the bound of every wait in the page

pytestmark = pytest.mark.timeout(180)


async def open_page(
    browser: Any, url: str, viewport: dict[str, int] = DESKTOP
) -> tuple[Any, list[str]]:
    """A new page at `url`, and the list its uncaught script errors go to."""
    page = await browser.new_page(viewport=viewport)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(url)
    return page, errors


async def badge_is(page: Any, text: str, timeout: int = WAIT_MS) -> None:
    await page.wait_for_function(
        "t => document.getElementById('badge').textContent === t", arg=text, timeout=timeout
    )


# Two different Hangul syllables drawn with the page's font: a missing font draws both as
# the same .notdef box, real glyphs differ.
GLYPHS_DIFFER = """([a, b]) => {
  const font = getComputedStyle(document.querySelector('.node-name')).fontFamily;
  const draw = (ch) => {
    const c = document.createElement('canvas'); c.width = 40; c.height = 40;
    const g = c.getContext('2d'); g.font = `32px ${font}`; g.fillText(ch, 2, 32);
    return Array.from(g.getImageData(0, 0, 40, 40).data).join(',');
  };
  const blank = draw(' ');
  return draw(a) !== draw(b) && draw(a) !== blank;
}"""


async def test_dashboard_follows_a_demo_run_to_the_end(browser: Any) -> None:
    scale = "0.5" if SCREENSHOTS else "0.05"
    srv = ServerProcess("--demo", "--demo-time-scale", scale, clean=True)
    try:
        await srv.start()
        page, errors = await open_page(browser, f"{srv.url}/")
        await page.wait_for_selector("#demo-start", state="visible", timeout=10_000)
        async with page.expect_response(
            lambda r: r.url.endswith("/demo/workflows") and r.request.method == "POST"
        ) as answer:
            await page.click("#demo-start")
        wf = (await (await answer.value).json())["workflow_id"]
        await page.wait_for_function(
            "wf => document.getElementById('wf-title').textContent === wf", arg=wf, timeout=5000
        )
        phone = None
        if SCREENSHOTS:
            phone, _ = await open_page(browser, f"{srv.url}/?workflow={wf}", PHONE)
            await shoot_running(page, phone, Path(SCREENSHOTS))
        await badge_is(page, "finished")

        # The truth, from the server: the plan and each node's last event.
        async with aiohttp.ClientSession() as session:
            msgs = await collect(session, f"{srv.url}/workflows/{wf}/events", timeout=30)
        events = [m.json() for m in msgs]
        plan = {n["node_id"]: n for n in events[0]["nodes"]}
        final = {
            e["node_id"]: e["event_type"].removeprefix("node_")
            for e in events
            if e["event_type"] in ("node_started", "node_completed", "node_failed", "node_skipped")
        }
        assert len(plan) == 30 and set(final.values()) <= {"completed", "skipped"}

        bar = page.locator("#bar")
        assert await bar.get_attribute("role") == "progressbar"
        assert await bar.get_attribute("aria-valuenow") == "100"
        assert await bar.get_attribute("aria-valuemin") == "0"
        assert await bar.get_attribute("aria-valuemax") == "100"
        assert await page.text_content("#percent") == "100.0 %"
        assert await page.text_content("#count") == "30 of 30 nodes"
        assert await page.text_content("#state") == "COMPLETED"
        assert (await page.text_content("#eta") or "").startswith("finished in")

        listed = await page.eval_on_selector_all(
            "#nodes li",
            "lis => lis.map(li => [li.dataset.nodeId, li.dataset.status,"
            " li.querySelector('.node-name').textContent])",
        )
        ids = [node_id for node_id, _, _ in listed]
        assert sorted(ids) == sorted(plan) and len(ids) == len(set(ids)) == 30
        assert ids == list(plan)  # in plan order
        for node_id, status, name in listed:
            assert status == final[node_id], node_id
            assert name == plan[node_id]["node_name"]
        names = {name for _, _, name in listed}
        assert {"품질 판정", "데이터 조회", "이상 탐지"} <= names
        assert await page.evaluate(GLYPHS_DIFFER, ["품", "질"]), "Hangul renders as boxes"

        seen = await page.evaluate("window.__seenIds")
        assert seen == [m.id for m in msgs]  # every event exactly once, in order
        log = await page.eval_on_selector_all("#events li", "lis => lis.length")
        assert log == 20
        assert await page.text_content("#events li:first-child .event-type") == (
            "workflow_state_changed"
        )
        streams = await page.evaluate(
            "wf => performance.getEntriesByType('resource')"
            ".filter(e => e.name.includes(`/workflows/${wf}/events`)).length",
            wf,
        )
        assert streams == 1  # one stream to the end: closed then, never reopened
        await page.screenshot(path=f"{os.environ.get('TMPDIR', '/tmp')}/dashboard-{wf}.png")
        if SCREENSHOTS and phone is not None:
            await badge_is(phone, "finished")
            await shoot_finished(page, phone, Path(SCREENSHOTS))
        assert errors == []
    finally:
        srv.stop()


async def shoot_running(page: Any, phone: Any, out: Path) -> None:
    """Screenshots while the run is about half done, with an ETA shown."""
    out.mkdir(parents=True, exist_ok=True)
    await page.wait_for_function(
        "() => Number(document.getElementById('bar').getAttribute('aria-valuenow')) >= 45"
        " && /left|unknown/.test(document.getElementById('eta').textContent)",
        timeout=WAIT_MS,
    )
    await page.screenshot(path=str(out / "dashboard-running.png"))
    await phone.screenshot(path=str(out / "dashboard-phone-running.png"))


async def shoot_finished(page: Any, phone: Any, out: Path) -> None:
    await page.wait_for_timeout(600)  # the final /progress fetch
    await phone.wait_for_timeout(600)
    await page.screenshot(path=str(out / "dashboard-finished.png"), full_page=True)
    await phone.screenshot(path=str(out / "dashboard-phone.png"))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
async def test_dashboard_reconnects_by_itself_after_a_server_restart(
    browser: Any, sig: int
) -> None:
    """The page's server dies mid-run and comes back on the same port; events published
    meanwhile (through a second server on the same Redis) arrive once each, none twice."""
    redis = await real_redis_or_skip()
    wf = "dash-" + uuid.uuid4().hex[:12]
    events = short_run(12)
    pair = RestartPair({"REDIS_URL": REDIS_URL}, retry_ms=500)
    other = pair.other
    ids: list[str] = []
    try:
        await pair.start()
        page, errors = await open_page(browser, f"{pair.url}/?workflow={wf}")
        await badge_is(page, "live", timeout=10_000)
        third = len(events) // 3
        for event in events[:third]:
            ids += await publish(other.url, wf, event)
        await page.wait_for_function(
            "n => window.__seenIds.length === n", arg=third, timeout=10_000
        )

        pair.end(sig)
        await badge_is(page, "reconnecting", timeout=10_000)
        for event in events[third : 2 * third]:
            ids += await publish(other.url, wf, event)  # while the page's server is down
        await asyncio.sleep(1.0)  # let the page fail to reconnect at least once
        assert await page.text_content("#badge") == "reconnecting"

        await pair.restart()
        t0 = time.monotonic()
        await page.wait_for_function(
            "n => window.__seenIds.length >= n", arg=2 * third, timeout=20_000
        )
        reconnect_s = time.monotonic() - t0
        for event in events[2 * third :]:
            ids += await publish(other.url, wf, event)
            await asyncio.sleep(0.01)
        await badge_is(page, "finished", timeout=20_000)

        assert await page.evaluate("window.__seenIds") == ids  # each event once, in order
        statuses = await page.eval_on_selector_all(
            "#nodes li", "lis => lis.map(li => [li.dataset.nodeId, li.dataset.status])"
        )
        assert len(statuses) == 12 and len({n for n, _ in statuses}) == 12
        assert dict(statuses)["n10"] == "skipped"
        assert all(s == "completed" for n, s in statuses if n != "n10")
        assert await page.get_attribute("#bar", "aria-valuenow") == "100"
        assert await page.text_content("#count") == "12 of 12 nodes"
        assert "데이터 조회" in (await page.text_content("#nodes") or "")
        assert errors == []
        assert reconnect_s < 15
    finally:
        pair.stop()
        await redis.delete(*redis_keys.workflow_keys(wf))
        await redis.aclose()


async def test_dashboard_retries_by_itself_when_the_browser_gives_up_on_a_503(
    browser: Any,
) -> None:
    """A 503 (here: MAX_STREAMS reached) closes an EventSource for good; the page opens a
    new one with ?lastEventId= after a backoff and still gets every event exactly once."""
    srv = ServerProcess("--max-streams", "1", "--heartbeat-seconds", "0.5", clean=True)
    try:
        await srv.start()
        wf = "dash-" + uuid.uuid4().hex[:12]
        events = short_run(5)
        ids = await publish(srv.url, wf, events[:4])
        first, _ = await open_page(browser, f"{srv.url}/?workflow={wf}")
        await first.wait_for_function("n => window.__seenIds.length === n", arg=4, timeout=10_000)
        second, errors = await open_page(browser, f"{srv.url}/?workflow={wf}")
        await badge_is(second, "reconnecting", timeout=10_000)  # its stream got a 503
        await first.close()  # frees the one stream slot (seen at the next heartbeat)
        await second.wait_for_function("n => window.__seenIds.length === n", arg=4, timeout=20_000)
        for event in events[4:]:
            ids += await publish(srv.url, wf, event)
        await badge_is(second, "finished", timeout=20_000)
        assert await second.evaluate("window.__seenIds") == ids
        assert await second.get_attribute("#bar", "aria-valuenow") == "100"
        assert errors == []
    finally:
        srv.stop()
