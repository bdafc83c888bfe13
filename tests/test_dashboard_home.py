"""The home (the live list of runs) in real headless Chromium, with axe-core.

As tests/test_dashboard_browser.py: Debian's Chromium under Playwright, skipped without
them except under REQUIRE_REDIS=1 (CI). With DASHBOARD_SCREENSHOTS=<dir> the demo test
also writes the README's pictures of the home there (home.png, home-phone.png).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server import auth, redis_keys
from testing.cleanup import forget
from testing.http import publish
from testing.procs import ServerProcess, free_port
from tests.conftest import REDIS_URL, real_redis_or_skip
from tests.test_dashboard_browser import PHONE, WAIT_MS, badge_is, open_page
from tests.test_dashboard_pictures import HOSTILE, axe_audit, ev, planned, state
from tests.test_runs import SECRET

SCREENSHOTS = os.environ.get("DASHBOARD_SCREENSHOTS")

pytestmark = pytest.mark.timeout(240)

READ_ROWS = """() => [...document.querySelectorAll('#runs > li.run')].map(li => ({
  id: li.dataset.workflowId, state: li.dataset.state, pct: Number(li.dataset.percentage),
  text: li.querySelector('.run-state-text').textContent,
  icon: li.querySelector('.run-icon').textContent,
  def: li.querySelector('.run-def').textContent,
  count: li.querySelector('.run-count').textContent,
  eta: li.querySelector('.run-eta').textContent,
  href: li.querySelector('a').getAttribute('href'),
}))"""

ROW_IDS = (
    "ids => JSON.stringify([...document.querySelectorAll('#runs > li.run')]"
    ".map(li => li.dataset.workflowId)) === JSON.stringify(ids)"
)


async def rows(page: Any) -> list[dict[str, Any]]:
    return list(await page.evaluate(READ_ROWS))


async def rows_are(page: Any, ids: list[str], timeout: int = WAIT_MS) -> None:
    """The list shows exactly these runs, in this order (waits, bounded)."""
    await page.wait_for_function(ROW_IDS, arg=ids, timeout=timeout)


async def region_violations(page: Any) -> list[str]:
    """axe's "region" rule (moderate): every piece of content inside a landmark."""
    found: list[str] = await page.evaluate(
        """async () => {
      const r = await axe.run(document, {runOnly: ['region'], resultTypes: ['violations']});
      return r.violations.flatMap(v => v.nodes.map(n => n.target.join(' ')));
    }"""
    )
    return found


async def audit(page: Any) -> None:
    assert await axe_audit(page) == []  # no serious or critical violation
    assert await region_violations(page) == []


def run_events(definition: str, ts: float, done: int = 0) -> list[dict[str, Any]]:
    """A running run of the 5-node plan with its first `done` nodes completed."""
    out = [planned(definition, ts), state("RUNNING", ts)]
    for n in "abcde"[:done]:
        out += [ev("node_started", n, ts), ev("node_completed", n, ts + 0.5)]
    return out


def finish(ts: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for n in "abcde":
        out += [ev("node_started", n, ts), ev("node_completed", n, ts)]
    return [*out, state("COMPLETED", ts)]


async def test_home_lists_a_demo_run_within_a_second_and_its_bar_moves_live(
    browser: Any,
) -> None:
    # Full length outside screenshots: the run must still be going after the bar, the ETA
    # and the watcher were checked, also on a loaded machine.
    scale = "0.3" if SCREENSHOTS else "1.0"
    srv = ServerProcess("--demo", "--demo-time-scale", scale, clean=True)
    try:
        await srv.start()
        page, errors = await open_page(browser, f"{srv.url}/")
        phone, phone_errors = await open_page(browser, f"{srv.url}/", PHONE)
        await page.wait_for_selector("#demo-start", state="visible", timeout=10_000)
        await badge_is(page, "live", timeout=10_000)
        await page.evaluate("window.__notReloaded = true")

        async with aiohttp.ClientSession() as session:
            async with session.post(f"{srv.url}/demo/workflows") as resp:
                assert resp.status == 201
                wf = (await resp.json())["workflow_id"]
            sent = time.monotonic()  # the run has started (its task publishes its plan next)
            row = f"#runs > li.run[data-workflow-id='{wf}']"
            await page.wait_for_selector(row, timeout=1000)
            listed_s = time.monotonic() - sent
        await phone.wait_for_selector(row, timeout=5000)
        print(f"demo run listed {listed_s:.3f} s after its POST was answered")
        assert listed_s < 1.0

        first = {r["id"]: r for r in await rows(page)}[wf]
        assert first["state"] == "RUNNING" and first["text"] == "RUNNING" and first["icon"] == "▶"
        assert first["def"] == "definition quality-inspection-v3"
        assert first["href"] == f"/?workflow={wf}"
        # Running first: every RUNNING row comes before any other.
        states = [r["state"] for r in await rows(page)]
        assert states == sorted(states, key=lambda s: s != "RUNNING")

        # The bar moves without a reload, and the ETA counts down between frames.
        await page.wait_for_function(
            "([row, pct]) => Number(document.querySelector(row).dataset.percentage) > pct",
            arg=[row, first["pct"]],
            timeout=WAIT_MS,
        )
        await page.wait_for_function(
            """row => {
              const t = document.querySelector(row + ' .run-eta').textContent;
              const n = window.__homeFrames, c = window.__etaSeen;
              window.__etaSeen = {n, t};
              return !!c && c.n === n && c.t !== t && /left|almost/.test(t);
            }""",
            arg=row,
            polling=100,
            timeout=WAIT_MS,
        )
        assert await page.evaluate("window.__notReloaded") is True
        nav = await page.evaluate("performance.getEntriesByType('navigation').length")
        assert nav == 1
        bar = await page.eval_on_selector(f"{row} .run-bar-fill", "b => b.style.width")
        assert float(bar.rstrip("%")) > first["pct"]

        # Someone watching the run is counted in its row (a few seconds behind),
        # while the run still goes (the demo runs at full length here for that).
        viewer, viewer_errors = await open_page(browser, f"{srv.url}/?workflow={wf}")
        await page.wait_for_function(
            "row => document.querySelector(row + ' .run-watchers').textContent === '1 watcher'",
            arg=row,
            timeout=WAIT_MS,
        )
        await viewer.close()

        await audit(page)  # mid-run, desktop and phone
        await audit(phone)
        if SCREENSHOTS:
            out = Path(SCREENSHOTS)
            out.mkdir(parents=True, exist_ok=True)
            # Two more runs, and the first of them finished: running rows above a finished one.
            more: list[str] = []
            async with aiohttp.ClientSession() as session:
                for _ in range(2):
                    async with session.post(f"{srv.url}/demo/workflows") as resp:
                        assert resp.status == 201
                        more.append((await resp.json())["workflow_id"])
            await page.wait_for_selector("#runs > li.run[data-state='COMPLETED']", timeout=WAIT_MS)
            await phone.wait_for_selector("#runs > li.run[data-state='COMPLETED']", timeout=WAIT_MS)
            for p in (page, phone):  # the new runs listed, every running row with its ETA
                await p.wait_for_function(
                    """ids => ids.every(id => document.querySelector(
                          `#runs > li.run[data-workflow-id='${id}']`))
                      && ![...document.querySelectorAll('#runs .run-eta')]
                          .some(e => e.textContent.startsWith('estimating'))""",
                    arg=more,
                    timeout=WAIT_MS,
                )
            await page.screenshot(path=str(out / "home.png"))
            await phone.screenshot(path=str(out / "home-phone.png"))

        # A click opens the run view; the way back is a link to the home.
        await page.click(f"{row} a")
        await page.wait_for_function(
            "wf => document.getElementById('wf-title').textContent === wf",
            arg=wf,
            timeout=5000,
        )
        assert page.url.endswith(f"/?workflow={wf}")
        assert await page.is_hidden("#home")
        await page.click("#back")
        await page.wait_for_selector(row, timeout=5000)
        assert await page.is_hidden("#view")
        assert page.url == f"{srv.url}/"
        await page.go_back()  # the browser's Back returns to the run
        await page.wait_for_selector("#view", state="visible", timeout=5000)
        assert await page.text_content("#wf-title") == wf
        assert errors == [] and phone_errors == [] and viewer_errors == []
    finally:
        srv.stop()


async def test_filters_keyboard_and_text_only(browser: Any) -> None:
    """Filters by state and definition, kept in the URL; runs leave and join a filtered
    list live; arrow keys and Enter; a definition id full of markup stays text."""
    srv = ServerProcess(clean=True)  # its embedded Redis: these runs are the only ones
    t = time.time()
    mine, other = "home-def-" + uuid.uuid4().hex[:6], HOSTILE
    a, b, c, d, e = (f"home-{x}-" + uuid.uuid4().hex[:8] for x in "abcde")
    try:
        await srv.start()
        await publish(srv.url, a, run_events(mine, t - 30, done=2))
        await publish(srv.url, b, run_events(other, t - 20, done=1))
        await publish(srv.url, c, [*run_events(mine, t - 60), *finish(t - 50)])
        page, errors = await open_page(browser, f"{srv.url}/?definition_id={mine}")
        await rows_are(page, [a, c])  # running first, then the finished one
        assert await page.input_value("#f-definition") == mine
        assert await page.input_value("#f-state") == ""
        listed = {r["id"]: r for r in await rows(page)}
        assert listed[a]["count"] == "2 of 5 completed" and listed[a]["pct"] == 40.0
        assert (listed[c]["state"], listed[c]["icon"], listed[c]["pct"]) == ("COMPLETED", "✓", 100)
        assert listed[c]["eta"] == ""

        # A filter reopens the stream with the query; EventSource asks for the stream itself.
        async with page.expect_request(lambda r: "/workflows?" in r.url) as opened:
            await page.select_option("#f-state", "RUNNING")
        request = await opened.value
        assert request.url == f"{srv.url}/workflows?state=RUNNING&definition_id={mine}"
        assert request.headers["accept"] == "text/event-stream"
        await rows_are(page, [a])
        assert page.url == f"{srv.url}/?state=RUNNING&definition_id={mine}"
        # a completes: it leaves the list; d starts: it joins; e (another definition) not.
        await publish(srv.url, a, [*finish(time.time())[4:]])
        await rows_are(page, [])
        await page.wait_for_selector("#runs-empty", state="visible", timeout=5000)
        await publish(srv.url, e, run_events("home-other-" + uuid.uuid4().hex[:6], time.time()))
        await publish(srv.url, d, run_events(mine, time.time(), done=1))
        await rows_are(page, [d])

        # The URL brings the filters back.
        await page.reload()
        await rows_are(page, [d])
        assert await page.input_value("#f-state") == "RUNNING"
        assert await page.input_value("#f-definition") == mine

        await page.click("#f-clear")
        order = await expected_order(page, [a, b, c, d, e])
        assert page.url == f"{srv.url}/"
        got = await rows(page)
        assert [r["id"] for r in got] == order
        assert [r["state"] for r in got][:3] == ["RUNNING"] * 3
        assert {r["id"] for r in got[:3]} == {b, d, e} and {r["id"] for r in got[3:]} == {a, c}

        # The hostile definition id is text: no element of it, nothing run.
        hostile = {r["id"]: r for r in got}[b]
        assert hostile["def"] == f"definition {HOSTILE}"
        assert await page.evaluate("window.__pwned") is None
        assert await page.locator("#boom, #home img, #home b").count() == 0
        tags = await page.evaluate(
            "() => [...new Set([...document.querySelectorAll('#runs *')].map(n => n.tagName))]"
        )
        assert set(tags) <= {"LI", "A", "SPAN", "TIME"}, tags
        options = await page.eval_on_selector_all(
            "#f-definitions option", "os => os.map(o => o.value)"
        )
        assert HOSTILE not in options and mine in options

        # Keyboard: each run is a link; arrows move between them, Enter opens one.
        await page.focus("#runs > li.run:first-child a")
        await page.keyboard.press("ArrowDown")
        focused = "document.activeElement.closest('li.run').dataset.workflowId"
        assert await page.evaluate(focused) == got[1]["id"]
        await page.keyboard.press("End")
        assert await page.evaluate(focused) == got[-1]["id"]
        await page.keyboard.press("ArrowUp")
        assert await page.evaluate(focused) == got[-2]["id"]
        await page.keyboard.press("Home")
        assert await page.evaluate(focused) == got[0]["id"]
        await page.keyboard.press("Tab")  # links: Tab goes on to the next run too
        assert await page.evaluate(focused) == got[1]["id"]
        await page.keyboard.press("Enter")
        await page.wait_for_function(
            "wf => document.getElementById('wf-title').textContent === wf",
            arg=got[1]["id"],
            timeout=5000,
        )
        await page.focus("#back")
        await page.keyboard.press("Enter")
        await page.wait_for_selector("#home", state="visible", timeout=5000)
        await page.wait_for_function(
            "n => document.querySelectorAll('#runs > li.run').length === n", arg=5, timeout=WAIT_MS
        )
        await audit(page)
        assert errors == []
    finally:
        srv.stop()


async def expected_order(page: Any, ids: list[str]) -> list[str]:
    """Once all of `ids` are listed: the order the page shows them in (checked after)."""
    await page.wait_for_function(
        "ids => ids.every(id => document.querySelector(`#runs > li.run[data-workflow-id='${id}']`))",
        arg=ids,
        timeout=WAIT_MS,
    )
    return [r["id"] for r in await rows(page)]


async def test_home_is_right_after_a_server_restart(browser: Any) -> None:
    """The page's server is SIGKILLed; meanwhile one run ends, one expires and one starts
    (through a second server on the same Redis). The EventSource reconnects by itself, gets
    the first page again, and the list is the server's."""
    redis = await real_redis_or_skip()
    definition = "home-def-" + uuid.uuid4().hex[:8]
    r1, r2, r3 = (f"home-r{i}-" + uuid.uuid4().hex[:8] for i in (1, 2, 3))
    port = free_port()
    env = {"REDIS_URL": REDIS_URL}
    other = ServerProcess(env=env, clean=True)
    servers = [ServerProcess("--retry-ms", "500", port=port, env=env, clean=True), other]
    try:
        for srv in servers:
            srv.launch()
        for srv in servers:
            await srv.wait_ready()
        t = time.time()
        await publish(other.url, r1, run_events(definition, t - 20, done=2))
        await publish(other.url, r2, run_events(definition, t - 10, done=1))
        page, errors = await open_page(browser, f"{servers[0].url}/?definition_id={definition}")
        await rows_are(page, [r2, r1])

        servers[0].end(signal.SIGKILL)
        await badge_is(page, "reconnecting", timeout=10_000)
        await publish(other.url, r1, finish(time.time())[4:])  # c, d, e and COMPLETED
        await redis.delete(*redis_keys.workflow_keys(r2))  # as if its keys had expired
        await publish(other.url, r3, run_events(definition, time.time(), done=3))
        servers.append(ServerProcess("--retry-ms", "500", port=port, env=env, clean=True))
        await servers[-1].start()
        sent = time.monotonic()
        await rows_are(page, [r3, r1], timeout=30_000)
        print(f"list right {time.monotonic() - sent:.2f} s after the restart")
        await badge_is(page, "live")
        listed = {r["id"]: r for r in await rows(page)}
        assert (listed[r1]["state"], listed[r1]["pct"], listed[r1]["count"]) == (
            "COMPLETED",
            100,
            "5 of 5 completed",
        )
        assert (listed[r3]["state"], listed[r3]["count"]) == ("RUNNING", "3 of 5 completed")
        # Still live after the reconnect.
        await publish(other.url, r3, [ev("node_started", "d", time.time())])
        await publish(other.url, r3, [ev("node_completed", "d", time.time())])
        await page.wait_for_function(
            "wf => document.querySelector(`#runs li[data-workflow-id='${wf}'] .run-count`)"
            ".textContent === '4 of 5 completed'",
            arg=r3,
            timeout=WAIT_MS,
        )
        assert errors == []
    finally:
        for srv in servers:
            srv.stop()
        await forget(redis, [r1, r2, r3])
        await redis.aclose()


async def test_home_with_subscribe_secret_lists_only_the_token_s_runs(browser: Any) -> None:
    """SUBSCRIBE_SECRET: without a token the home says one is needed; with the
    access_token cookie (the page's way for every stream) it lists the token's runs only."""
    srv = ServerProcess(env={"SUBSCRIBE_SECRET": SECRET}, clean=True)
    definition = "home-def-" + uuid.uuid4().hex[:6]
    mine, theirs = (f"home-{x}-" + uuid.uuid4().hex[:8] for x in ("mine", "theirs"))
    context = None
    try:
        await srv.start()
        await publish(srv.url, mine, run_events(definition, time.time(), done=1))
        await publish(srv.url, theirs, run_events(definition, time.time(), done=2))
        page, errors = await open_page(browser, f"{srv.url}/")
        await page.wait_for_selector("#home-error", state="visible", timeout=WAIT_MS)
        assert "token" in (await page.text_content("#home-error") or "")
        assert await page.locator("#runs > li").count() == 0

        context = await browser.new_context(viewport=PHONE)
        token = auth.mint(SECRET, [mine], 600)
        await context.add_cookies([{"name": "access_token", "value": token, "url": srv.url}])
        reader = await context.new_page()
        reader_errors: list[str] = []
        reader.on("pageerror", lambda exc: reader_errors.append(str(exc)))
        await reader.goto(f"{srv.url}/")
        await rows_are(reader, [mine])
        await reader.click(f"#runs > li[data-workflow-id='{mine}'] a")
        await badge_is(reader, "live")  # its event stream takes the same cookie
        await reader.wait_for_selector("#nodes li", timeout=WAIT_MS)
        assert errors == [] and reader_errors == []
    finally:
        if context is not None:
            await context.close()
        srv.stop()
