"""Reading the server's /metrics (the Prometheus text exposition) in a test."""

from __future__ import annotations

import re

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of `name` with exactly these labels (in any order); None when absent."""
    want = sorted(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = _SAMPLE.fullmatch(line)
        if m and m.group(1) == name and sorted(filter(None, (m.group(2) or "").split(","))) == want:
            return float(m.group(3))
    return None
