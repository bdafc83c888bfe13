"""The original front end's WebSocket hook, unchanged, in headless Chromium against the new server.

The hook below is the React hook's WebSocket code as plain JavaScript (React's state
setters become plain assignments): open `/api/v1/workflows/ws/<instanceId>`, JSON.parse
each message, keep node statuses, reconnect on an unexpected close. It knows nothing of
event ids or SSE. Needs Debian's chromium and `pip install playwright` (never `playwright
install`); skipped when missing, except under REQUIRE_REDIS=1, where that fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from server import app_keys
from tests.conftest import Serve

WAIT_MS = 30_000

pytestmark = pytest.mark.timeout(120)

# The original hook, minus React: the same socket code, callbacks instead of setState.
HOOK_JS = """
function useWorkflowWebSocket(instanceId, { onEvent, onStatus }) {
  let ws = null;
  let reconnectTimer = null;
  let attempts = 0;
  let unmounted = false;

  function connect() {
    const proto = WS_BASE.startsWith("https") ? "wss" : "ws";
    ws = new WebSocket(`${proto}://${WS_BASE.replace(/^https?:\\/\\//, "")}/api/v1/workflows/ws/${instanceId}`);
    ws.onopen = () => { attempts = 0; onStatus("connected"); };
    ws.onmessage = (event) => {
      const data = JSON.parse(event.data);
      onEvent(data);
    };
    ws.onerror = () => onStatus("error");
    ws.onclose = (event) => {
      onStatus(`closed ${event.code}`);
      if (unmounted || event.code === 1000) return;  // the run is over
      attempts += 1;
      reconnectTimer = setTimeout(connect, Math.min(1000 * attempts, 5000));
    };
  }
  connect();
  return {
    socket: () => ws,
    unmount() { unmounted = true; clearTimeout(reconnectTimer); ws && ws.close(); },
  };
}
"""

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>original hook</title>
<pre id="log"></pre>
<script>
const WS_BASE = new URLSearchParams(location.search).get("server");
const INSTANCE = new URLSearchParams(location.search).get("instance");
%(hook)s
// What the React component kept in state.
window.received = [];
window.nodeStatuses = {};
window.workflowState = null;
window.statuses = [];
window.hook = useWorkflowWebSocket(INSTANCE, {
  onEvent(data) {
    window.received.push(data);
    switch (data.event_type) {
      case "node_started":
      case "node_completed":
      case "node_failed":
        window.nodeStatuses[data.node_id] = { status: data.event_type, name: data.node_name };
        break;
      case "workflow_state_changed":
        window.workflowState = data.to_state;
        break;
    }
  },
  onStatus(s) { window.statuses.push(s); document.getElementById("log").textContent += s + "\\n"; },
});
</script>
"""


@pytest.fixture
async def page_server(tmp_path: Path) -> AsyncIterator[str]:
    """The test page, served from a tiny app of its own (another origin, like a React dev server)."""
    (tmp_path / "index.html").write_text(PAGE % {"hook": HOOK_JS}, encoding="utf-8")
    app = web.Application()
    app.router.add_static("/", tmp_path)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/index.html"))
    finally:
        await server.close()


def drop_connections(serve: Serve) -> None:
    """Abort every connection of the server under test, as a dead network would."""
    for server in serve.servers:
        assert server.runner is not None and server.runner.server is not None
        for handler in server.runner.server.connections:
            if handler.transport is not None:
                handler.transport.abort()


def node_events(wf: str, nodes: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(nodes):
        node = {"node_id": f"node_{i}", "node_name": f"단계 {i}"}
        out.append({"event_type": "node_started", **node})
        out.append({"event_type": "node_completed", **node, "duration_ms": i})
    return out


async def test_the_original_hook_receives_every_event_in_chromium(
    browser: Any, serve: Serve, page_server: str, new_workflow: Callable[[], str]
) -> None:
    base, wf = await serve(), new_workflow()
    publisher = serve.apps[0][app_keys.publisher_key]
    ids = [await publisher.emit_state_change(wf, "PENDING", "RUNNING")]
    ids += await publisher.publish_many(wf, node_events(wf, 10))  # before the page: replay

    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"{page_server}?server={base}&instance={wf}")
    await page.wait_for_function("n => window.received.length >= n", arg=len(ids), timeout=WAIT_MS)

    # Live, while the page listens; then a drop the hook did not ask for, mid-run.
    for i in range(10, 20):
        ids += await publisher.publish_many(wf, node_events(wf, 20)[2 * i : 2 * i + 2])
        await asyncio.sleep(0.01)
    await page.wait_for_function("n => window.received.length >= n", arg=len(ids), timeout=WAIT_MS)
    drop_connections(serve)  # a network blip: the TCP connection dies, no close frame
    await page.wait_for_function(
        "window.statuses.filter(s => s === 'connected').length >= 2", timeout=WAIT_MS
    )
    ids += await publisher.publish_many(wf, node_events(wf, 25)[40:])
    ids.append(await publisher.emit_state_change(wf, "RUNNING", "COMPLETED"))
    await page.wait_for_function("window.statuses.includes('closed 1000')", timeout=WAIT_MS)

    received = await page.evaluate("window.received")
    statuses = await page.evaluate("window.statuses")
    node_statuses = await page.evaluate("window.nodeStatuses")
    state = await page.evaluate("window.workflowState")
    await page.close()

    assert errors == []
    # Every event arrived, each as the SSE object plus `id`. The unchanged hook reconnects
    # without an id, so after the blip the history is replayed (its state is keyed by node,
    # so a replay redraws the same thing); with `?lastEventId=` it would resume instead.
    got = [m["id"] for m in received]
    assert set(got) == set(ids)
    first_pass = got[: got.index(ids[0], 1)] if got.count(ids[0]) > 1 else got
    assert first_pass == ids[: len(first_pass)]  # in order, none skipped, before the blip
    assert got[-len(ids) :] == ids  # the reconnect replays everything, in order, to the end
    assert statuses[-1] == "closed 1000" and statuses.count("connected") == 2
    assert state == "COMPLETED"
    assert len(node_statuses) == 25
    assert all(s["status"] == "node_completed" for s in node_statuses.values())
    assert node_statuses["node_3"]["name"] == "단계 3"
