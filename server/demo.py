"""A simulated workflow engine for `--demo`: one 30-node definition, run again and again.

~460 lines: a quarter is data (the 30 nodes with their names in two languages, durations
and branches); the rest is the engine, the runner that starts and paces runs, and the two
routes, which share the demo's settings and would each be a few lines alone."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from server import app_keys
from server.problems import Problem
from server.publisher import Publisher

logger = logging.getLogger(__name__)

DEFINITION_ID = "quality-inspection-v3"
MAX_CONCURRENCY = 4
# Seconds between the end of one background run and the start of the next, before scaling.
PAUSE_BETWEEN_RUNS = 8.0
# Runs started with POST /demo/workflows that may be in flight at once.
MAX_EXTRA_RUNS = 20
# Settings.demo_time_scale multiplies every simulated duration (0.05: a run in a few seconds).
DEFAULT_TIME_SCALE = 1.0


@dataclass(frozen=True)
class DemoNode:
    """One node of the demo definition: its median duration is in seconds, before scaling."""

    node_id: str
    name: str
    node_type: str
    depends_on: tuple[str, ...]
    median_s: float
    errors: tuple[str, ...] = ()


# A manufacturing lot's quality inspection: three parallel branches (lot data, sensors,
# images) join into the decision, then fan out to reporting and the shop-floor systems.
# Listed in a topological order.
NODES: tuple[DemoNode, ...] = (
    DemoNode("receive_batch", "Receive batch", "trigger", (), 0.6),
    DemoNode(
        "lot_query",
        "데이터 조회",
        "db_query",
        ("receive_batch",),
        3.0,
        ("OperationalError: could not obtain lock on table lots",),
    ),
    DemoNode(
        "sensor_load",
        "Load sensor readings",
        "io",
        ("receive_batch",),
        3.8,
        ("TimeoutError: object store read timed out after 30 s",),
    ),
    DemoNode(
        "image_fetch",
        "Fetch inspection images",
        "io",
        ("receive_batch",),
        4.5,
        ("ConnectionResetError: camera gateway closed the connection",),
    ),
    DemoNode("lot_validate", "로트 메타데이터 검증", "validate", ("lot_query",), 1.5),
    DemoNode("sensor_denoise", "센서 노이즈 제거", "transform", ("sensor_load",), 3.0),
    DemoNode("sensor_resample", "Resample to 10 ms", "transform", ("sensor_denoise",), 2.2),
    DemoNode("sensor_features", "Sensor features", "feature", ("sensor_resample",), 3.8),
    DemoNode("image_decode", "Decode images", "transform", ("image_fetch",), 2.2),
    DemoNode("image_qc", "이미지 품질 검사", "validate", ("image_decode",), 1.8),
    DemoNode(
        "defect_segment",
        "Defect segmentation",
        "ml_inference",
        ("image_qc",),
        7.5,
        ("CUDA error: out of memory (tried to allocate 512 MiB)",),
    ),
    DemoNode("image_embed", "Image embeddings", "ml_inference", ("image_qc",), 5.2),
    DemoNode(
        "erp_sync",
        "ERP 동기화",
        "api_call",
        ("lot_validate",),
        3.0,
        ("HTTP 502 from erp.internal: bad gateway", "연결 시간 초과 (ERP 응답 없음)"),
    ),
    DemoNode("supplier_lookup", "Supplier lookup", "api_call", ("lot_validate",), 2.2),
    DemoNode("spc_rules", "SPC 규칙 검사", "rule", ("sensor_features",), 1.5),
    DemoNode(
        "feature_join",
        "Join features",
        "transform",
        ("lot_validate", "sensor_features", "defect_segment", "image_embed"),
        1.5,
    ),
    DemoNode(
        "anomaly_detect",
        "이상 탐지",
        "ml_inference",
        ("feature_join",),
        6.0,
        ("RuntimeError: model server returned NaN scores",),
    ),
    DemoNode("drift_check", "Model drift check", "ml_inference", ("feature_join",), 3.0),
    DemoNode(
        "quality_decision",
        "품질 판정",
        "decision",
        ("anomaly_detect", "spc_rules", "drift_check", "supplier_lookup"),
        1.0,
    ),
    DemoNode("rework_plan", "재작업 계획", "decision", ("quality_decision",), 2.2),
    DemoNode("rework_notify", "Notify rework line", "notify", ("rework_plan",), 1.2),
    DemoNode("report_build", "Build inspection report", "report", ("quality_decision",), 4.5),
    DemoNode("report_translate", "보고서 번역", "report", ("report_build",), 2.2),
    DemoNode("image_archive", "Archive images", "io", ("defect_segment",), 3.0),
    DemoNode(
        "mes_update",
        "MES 업데이트",
        "api_call",
        ("quality_decision", "erp_sync"),
        2.2,
        ("HTTP 503 from mes.plant-2: maintenance window",),
    ),
    DemoNode("certificate", "Issue quality certificate", "api_call", ("quality_decision",), 1.5),
    DemoNode("kpi_refresh", "Refresh KPI dashboard", "io", ("mes_update",), 1.5),
    DemoNode("audit_log", "감사 로그 기록", "io", ("mes_update", "certificate"), 0.9),
    DemoNode(
        "notify_owner",
        "담당자 알림",
        "notify",
        ("report_translate", "audit_log", "rework_notify"),
        0.5,
    ),
    DemoNode(
        "close_batch",
        "Close batch",
        "trigger",
        ("notify_owner", "image_archive", "kpi_refresh"),
        0.3,
    ),
)

BY_ID = {node.node_id: node for node in NODES}
# The branch that only runs when the decision asks for rework; skipped otherwise.
SKIPPABLE_BRANCH = ("rework_plan", "rework_notify")
SIGMA = 0.45  # lognormal spread of every duration
FAIL_RATE = 0.03  # chance that a node's first attempt fails (then it is retried)
SKIP_RATE = 0.6  # chance that the rework branch is skipped


def plan_event() -> dict[str, Any]:
    """The `workflow_planned` event of the demo definition."""
    return {
        "event_type": "workflow_planned",
        "definition_id": DEFINITION_ID,
        "max_concurrency": MAX_CONCURRENCY,
        "nodes": [
            {
                "node_id": n.node_id,
                "node_name": n.name,
                "node_type": n.node_type,
                "depends_on": list(n.depends_on),
            }
            for n in NODES
        ],
    }


@dataclass(frozen=True)
class Script:
    """What one run will do, decided up front: durations (s, unscaled), failures, skips."""

    durations: dict[str, float]
    failures: dict[str, str]  # node_id -> error of its failed first attempt
    skipped: frozenset[str]


def make_script(rng: random.Random) -> Script:
    """Draw one run: lognormal durations around each node's median, a rare failure, a skip."""
    durations = {n.node_id: n.median_s * math.exp(rng.gauss(0.0, SIGMA)) for n in NODES}
    failures: dict[str, str] = {}
    for n in NODES:
        if rng.random() < FAIL_RATE:
            failures[n.node_id] = rng.choice(n.errors or ("TimeoutError: worker heartbeat lost",))
    skipped = frozenset(SKIPPABLE_BRANCH) if rng.random() < SKIP_RATE else frozenset()
    failures = {k: v for k, v in failures.items() if k not in skipped}  # a skipped node never runs
    return Script(durations, failures, skipped)


def new_workflow_id() -> str:
    """A readable, unique id: `demo-<UTC time>-<random>`."""
    return f"demo-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


@dataclass
class DemoEngine:
    """Runs the demo definition over a publisher, like a real engine would."""

    publisher: Publisher
    time_scale: float = DEFAULT_TIME_SCALE
    rng: random.Random = field(default_factory=random.Random)

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds * self.time_scale)

    async def run(self, workflow_id: str, script: Script | None = None) -> None:
        """Publish one complete run of the definition, ending in COMPLETED."""
        script = script or make_script(self.rng)
        publish = self.publisher.publish
        await publish(workflow_id, plan_event())
        await publish(
            workflow_id,
            {
                "event_type": "workflow_state_changed",
                "from_state": "PENDING",
                "to_state": "RUNNING",
            },
        )
        done: set[str] = set()
        running: dict[str, asyncio.Task[None]] = {}
        waiting = list(NODES)
        try:
            while waiting or running:
                ready_before = len(waiting)
                for node in list(waiting):
                    if len(running) >= MAX_CONCURRENCY:
                        break
                    if not all(dep in done for dep in node.depends_on):
                        continue
                    waiting.remove(node)
                    if node.node_id in script.skipped:
                        reason = "quality decision: lot passed, no rework needed"
                        await publish(
                            workflow_id,
                            {
                                "event_type": "node_skipped",
                                "node_id": node.node_id,
                                "reason": reason,
                            },
                        )
                        done.add(node.node_id)
                        continue
                    running[node.node_id] = asyncio.create_task(
                        self._run_node(workflow_id, node, script), name=f"demo:{node.node_id}"
                    )
                if not running:
                    if len(waiting) == ready_before:
                        raise RuntimeError("demo DAG is stuck: no node can start")
                    continue  # a skip made more nodes ready
                finished, _ = await asyncio.wait(
                    running.values(), return_when=asyncio.FIRST_COMPLETED
                )
                for node_id, task in list(running.items()):
                    if task in finished:
                        task.result()  # a failed publish ends the run
                        del running[node_id]
                        done.add(node_id)
        finally:
            for task in running.values():
                task.cancel()
            await asyncio.gather(*running.values(), return_exceptions=True)
        await publish(
            workflow_id,
            {
                "event_type": "workflow_state_changed",
                "from_state": "RUNNING",
                "to_state": "COMPLETED",
            },
        )

    async def _run_node(self, workflow_id: str, node: DemoNode, script: Script) -> None:
        error = script.failures.get(node.node_id)
        if error is not None:
            # The first attempt dies part-way through; the engine backs off and retries.
            t0 = await self._start(workflow_id, node)
            await self._sleep(script.durations[node.node_id] * 0.4)
            await self.publisher.publish(
                workflow_id,
                {
                    "event_type": "node_failed",
                    "node_id": node.node_id,
                    "node_name": node.name,
                    "node_type": node.node_type,
                    "error": error,
                    "duration_ms": _ms_since(t0),
                },
            )
            await self._sleep(1.0)
        t0 = await self._start(workflow_id, node)
        total = script.durations[node.node_id]
        steps = int(total // 1.5)  # a progress report every ~1.5 s of a longer node
        for i in range(1, steps + 1):
            await self._sleep(total / (steps + 1))
            await self.publisher.publish(
                workflow_id,
                {
                    "event_type": "node_progress",
                    "node_id": node.node_id,
                    "fraction": round(i / (steps + 1), 3),
                    "message": f"step {i} of {steps + 1}",
                },
            )
        await self._sleep(total / (steps + 1))
        await self.publisher.publish(
            workflow_id,
            {
                "event_type": "node_completed",
                "node_id": node.node_id,
                "node_name": node.name,
                "node_type": node.node_type,
                "duration_ms": _ms_since(t0),
            },
        )

    async def _start(self, workflow_id: str, node: DemoNode) -> float:
        await self.publisher.publish(
            workflow_id,
            {
                "event_type": "node_started",
                "node_id": node.node_id,
                "node_name": node.name,
                "node_type": node.node_type,
            },
        )
        return time.monotonic()


def _ms_since(t0: float) -> int:
    """Real elapsed milliseconds, so `duration_ms` agrees with the event timestamps."""
    return max(0, round((time.monotonic() - t0) * 1000))


class DemoRunner:
    """The background loop (one run after another) plus runs started over HTTP."""

    def __init__(self, engine: DemoEngine) -> None:
        self.engine = engine
        self.current: str | None = None
        self.recent: list[str] = []
        self._extra: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.create_task(self._forever(), name="demo:loop")

    async def _run(self, workflow_id: str) -> None:
        self.current = workflow_id
        self.recent = [workflow_id, *self.recent[:9]]
        logger.info("demo: run %s started", workflow_id)
        try:
            await self.engine.run(workflow_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("demo: run %s failed", workflow_id)
        else:
            logger.info("demo: run %s completed", workflow_id)

    async def _forever(self) -> None:
        while True:
            await self._run(new_workflow_id())
            await self.engine._sleep(PAUSE_BETWEEN_RUNS)

    def start_extra(self) -> str:
        """Start one more run now; returns its workflow id."""
        if len(self._extra) >= MAX_EXTRA_RUNS:
            raise Problem(
                503,
                f"{MAX_EXTRA_RUNS} demo runs are already in flight",
                headers={"Retry-After": "5"},
                slug="too-many-demo-runs",
            )
        workflow_id = new_workflow_id()
        task = asyncio.create_task(self._run(workflow_id), name=f"demo:{workflow_id}")
        self._extra.add(task)
        task.add_done_callback(self._extra.discard)
        return workflow_id

    async def close(self) -> None:
        """Cancel every run and wait for them."""
        tasks = [t for t in (self._loop, *self._extra) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


runner_key: web.AppKey[DemoRunner] = web.AppKey("demo_runner", DemoRunner)


async def start_run(request: web.Request) -> web.Response:
    """POST /demo/workflows: start one more demo run; 201 with its id."""
    workflow_id = request.app[runner_key].start_extra()
    return web.json_response(
        {"workflow_id": workflow_id},
        status=201,
        headers={"Location": f"/workflows/{workflow_id}/events"},
    )


async def demo_info(request: web.Request) -> web.Response:
    """GET /demo/workflows: 200 while the demo is on (the route is absent otherwise)."""
    runner = request.app[runner_key]
    return web.json_response(
        {
            "enabled": True,
            "definition_id": DEFINITION_ID,
            "current": runner.current,
            "recent": runner.recent,
        }
    )


def _dashboard_url(app: web.Application) -> str:
    settings = app[app_keys.settings_key]
    host = settings.host if settings.host not in ("", "0.0.0.0", "::") else "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}/"


def setup_demo(app: web.Application, *, time_scale: float | None = None) -> None:
    """Add the demo routes and the background engine, started and cancelled with the app."""
    if time_scale is None:
        time_scale = float(
            getattr(app[app_keys.settings_key], "demo_time_scale", DEFAULT_TIME_SCALE)
        )
    if not time_scale > 0:
        raise ValueError(f"the demo time scale must be positive, got {time_scale}")
    scale = time_scale

    async def demo_ctx(app: web.Application) -> AsyncIterator[None]:
        # The publisher is put in place by a cleanup_ctx registered before this one.
        runner = DemoRunner(DemoEngine(app[app_keys.publisher_key], time_scale=scale))
        app[runner_key] = runner
        runner.start()
        logger.info(
            "demo engine running (time scale %g): open %s to watch", scale, _dashboard_url(app)
        )
        yield
        await runner.close()

    app.cleanup_ctx.append(demo_ctx)
    app.router.add_post("/demo/workflows", start_run)
    app.router.add_get("/demo/workflows", demo_info)
