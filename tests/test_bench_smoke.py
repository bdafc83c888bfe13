"""Every benchmark entry point runs at a tiny scale, so that none rots unseen.

Each is `python -m bench.<name>` from the repository root against the session's Redis;
it must exit 0 and print its table's header and a data row. The baselines
(bench/baselines/seed_style.py, bare_hub.py) and bench/loadgen.py run inside fanout;
Nchan (nginx) is optional and not run here. Every key a run makes is deleted by the run
(its duration history by the session, tests/conftest.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import cpu_quota
from tests.conftest import REDIS_URL, real_redis_or_skip

ROOT = Path(__file__).resolve().parent.parent

# (module, tiny flags, a line of its table's header, a data row it must print)
CASES = [
    (
        "fanout",
        ["--systems", "ours,seed,bare", "--scenarios", "S1", "--s1-sizes", "3"],
        "| system | established |",
        r"^\| bare \| 3 \| 0 \|",
    ),
    (
        "publish_path",
        [
            "--workflows",
            "3",
            "--events",
            "30",
            "--rate",
            "0",
            "--connections",
            "2",
            "--max-seconds",
            "10",
        ],
        "| variant | events |",
        r"^\| this \| 30 \|",
    ),
    (
        "publish_cost",
        ["--smoke", "--events", "20", "--polls", "3"],
        "plan nodes",
        r"^\s+30\s+\d+\.\d+\s+\d+\.\d+$",
    ),
    (
        "hub_cost",
        ["--messages", "200", "--batch", "10", "--runs", "1"],
        "| run | blocks | lines |",
        r"^\| median \| \d+\.\d+ \| \d+\.\d+ \|$",
    ),
    ("eta_quality", ["--traces", "2", "--smoke"], "| scenario ", r"^\| default .*\| wfsse +\| +\d"),
    ("plan_post", ["--rounds", "1"], "body: ", r"^longest loop stall ms: median \d"),
    ("poll_latency", ["--smoke", "--polls", "10"], "workflow ", r"^long\s+1000\s+1000\s"),
    (
        "run_list",
        [
            "--runs",
            "120",
            "--requests",
            "3",
            "--overview-runs",
            "5",
            "--overview-seconds",
            "2",
            "--overview-lanes",
            "2",
        ],
        "| runs | request |",
        r"^\| 120 \| walk pages \(cursor\) \| [1-9]",
    ),
]
NO_REDIS = {"eta_quality"}


@pytest.mark.parametrize(("name", "flags", "header", "row"), CASES, ids=[c[0] for c in CASES])
async def test_bench_runs_at_a_tiny_scale(
    name: str, flags: list[str], header: str, row: str
) -> None:
    if name not in NO_REDIS:
        client = await real_redis_or_skip()
        await client.aclose()
        flags = [*flags, "--redis-url", REDIS_URL]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", *flags],
        cwd=ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - started
    out = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{out[-3000:]}\n{done.stderr[-3000:]}"
    assert header in out, out[-3000:]
    assert re.search(row, out, re.M), out[-3000:]
    assert took < 45, f"{name} took {took:.1f} s at its tiny scale"


def test_cpu_quota_caps_a_process_or_says_why_not() -> None:
    """Root with cgroup v1: a child is capped in a group of its own, removed afterwards;
    elsewhere available() says why not (fanout's --cpu-quota then refuses to start)."""
    why = cpu_quota.available()
    if why is not None:
        assert isinstance(why, str) and why
        return
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with cpu_quota.capped([child.pid], 0.5) as groups:
            assert len(groups) == 1 and groups[0].is_dir()
            assert str(child.pid) in (groups[0] / "cgroup.procs").read_text().split()
            assert (groups[0] / "cpu.cfs_quota_us").read_text().strip() != "-1"
        assert not groups[0].exists()
    finally:
        child.kill()
        child.wait(10)
