"""Cap processes' CPU with the cgroup v1 `cpu` controller, so worker scaling is measurable
on a small box: each capped worker gets `cpus` of a core (cfs_quota_us / cfs_period_us)
in a group of its own, while the load generator and Redis stay outside. Then a worker's
quota, not the two shared cores, bounds what it serves, as on a host with a core per
worker. Needs root and `/sys/fs/cgroup/cpu` (cgroup v1); groups are removed afterwards."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path("/sys/fs/cgroup/cpu")


def available() -> str | None:
    """None when quotas can be set here, else why not."""
    if not (ROOT / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {ROOT}"
    if not os.access(ROOT, os.W_OK):
        return f"{ROOT} is not writable (needs root)"
    return None


@contextlib.contextmanager
def capped(
    pids: Sequence[int], cpus: float, period_us: int = 10_000, tag: str = "wfsse-bench"
) -> Iterator[list[Path]]:
    """Put each of `pids` in its own group limited to `cpus` CPUs; undo on exit.

    The quota is granted per `period_us` (10 ms, not the kernel's default 100 ms): a
    process that spent its quota waits for the next period, and a 60 ms pause every
    100 ms would show as latency no host with a core per worker has."""
    why = available()
    if why is not None:
        raise RuntimeError(why)
    groups: list[Path] = []
    try:
        for pid in pids:
            group = ROOT / f"{tag}-{os.getpid()}-{pid}"
            group.mkdir()
            groups.append(group)
            (group / "cpu.cfs_period_us").write_text(str(period_us))
            (group / "cpu.cfs_quota_us").write_text(str(int(cpus * period_us)))
            (group / "cgroup.procs").write_text(str(pid))
        yield groups
    finally:
        for group in groups:
            release(group)


def release(group: Path) -> None:
    """Move what is left in `group` back to the root group and remove it."""
    with contextlib.suppress(OSError):
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (ROOT / "cgroup.procs").write_text(pid)
    for _ in range(50):  # rmdir fails while the kernel still counts an exiting task
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


def throttled_seconds(groups: Sequence[Path]) -> float:
    """CPU time the quota held back, summed over `groups` (cpu.stat throttled_time, ns)."""
    total = 0
    for group in groups:
        with contextlib.suppress(OSError):
            for line in (group / "cpu.stat").read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == "throttled_time":
                    total += int(value)
    return total / 1e9
