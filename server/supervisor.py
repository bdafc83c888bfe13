"""`WORKERS=N`: N server processes on one port (SO_REUSEPORT), supervised by this one."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

logger = logging.getLogger(__name__)

CHILD_FLAG = "--worker-child"  # internal: marks a process started by the supervisor
GRACE_SECONDS = 5.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h  # the SPEC's "exit 0 within 5 s" after SIGTERM


def worker_count(workers: str) -> int:
    """`auto` is the number of cores this process may use."""
    if workers == "auto":
        return (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
    return int(workers)


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the supervisor dies, even by SIGKILL (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: a killed supervisor leaves its workers to the service manager


def supervise(argv: Sequence[str], count: int) -> int:
    """Run `count` workers with the same arguments; restart any that dies; SIGTERM reaches all."""
    args = [a for a in argv if not a.startswith("--workers")]
    # `--workers=N` and `--workers N` both: drop the flag's value too.
    if "--workers" in argv:
        i = list(argv).index("--workers")
        args = list(argv[:i]) + list(argv[i + 2 :])
    cmd = [sys.executable, "-m", "server", *args, "--workers", "1", CHILD_FLAG]
    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def spawn(slot: int) -> None:
        children[slot] = subprocess.Popen(cmd, preexec_fn=_die_with_parent)
        logger.info("worker %d started (pid %d)", slot, children[slot].pid)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for slot in range(count):
        spawn(slot)
    restarts: dict[int, float] = {}
    while not stopping:
        for slot, child in list(children.items()):
            if child.poll() is not None and not stopping:
                # A worker died on its own: replace it, at most once a second per slot.
                logger.warning("worker %d exited with %s; restarting", slot, child.returncode)
                wait = restarts.get(slot, 0.0) + 1.0 - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                restarts[slot] = time.monotonic()
                spawn(slot)
        time.sleep(0.1)
    deadline = time.monotonic() + GRACE_SECONDS
    code = 0
    for child in children.values():
        try:
            code |= child.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            child.kill()
            code = 1
    return code
