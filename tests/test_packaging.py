"""The package as a new user installs it: sdist and wheel, outside the checkout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import aiohttp
import pytest

from testing.procs import ServerProcess

ROOT = Path(__file__).resolve().parent.parent


def run(*cmd: str | Path, cwd: Path) -> None:
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{cmd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.mark.timeout(900)
async def test_the_wheel_built_from_the_sdist_serves_the_dashboard_when_installed(
    tmp_path: Path,
) -> None:
    # `python -m build` makes the sdist, then the wheel from that sdist: a file the sdist
    # lacks is missing from the wheel too.
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--outdir", dist, ROOT, cwd=tmp_path)
    wheels = list(dist.glob("*.whl"))
    assert len(wheels) == 1 and list(dist.glob("*.tar.gz"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        assert "server/lua/append.lua" in wheel.namelist()
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    run(env_dir / "bin" / "python", "-m", "pip", "install", "-q", wheels[0], cwd=tmp_path)
    # The installed package loads its append script (package data, not the checkout's).
    loads = (
        "from server import append_script as a; assert 'XADD' in a.APPEND_LUA; print(a.__file__)"
    )
    loaded = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", loads],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert Path(loaded.stdout.strip()).is_relative_to(env_dir)

    elsewhere = tmp_path / "elsewhere"  # not the checkout: nothing found by accident
    elsewhere.mkdir()
    # The installed copy only: no PYTHONPATH into the checkout, the venv first on PATH.
    env = {"PATH": f"{env_dir / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": ""}
    command = [str(env_dir / "bin" / "workflow-sse")]
    server = ServerProcess("--demo", env=env, clean=True, command=command, cwd=elsewhere)
    base = server.url
    try:
        await server.start(timeout=30)  # /readyz answered 200
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/") as resp:
                assert resp.status == 200
                page = await resp.text()
            assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page)
            assert any("app.js" in a for a in assets) and any("style.css" in a for a in assets)
            for asset in assets:
                async with s.get(base + asset) as resp:
                    assert resp.status == 200, asset
                    assert len(await resp.read()) > 100
    finally:
        server.stop()
