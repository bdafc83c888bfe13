"""Where the dashboard's files are: inside the installed package, or in the checkout."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def static_dir() -> Path:
    """The folder of index.html, app.js and style.css.

    The repository keeps them in the top-level `static/`; a wheel or sdist install puts
    them in the package as `server/static/` (pyproject's package-dir). An editable
    install or a run from the tree has no copy in the package: the checkout's is used.
    """
    packaged = Path(str(files("server"))) / "static"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "static"
