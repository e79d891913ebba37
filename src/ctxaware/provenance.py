"""Where a result came from: package version, git commit, library versions, host and time.

`provenance()` returns a small JSON-able dict that a command stores beside its results (``provenance.json``
or a ``"provenance"`` key of its summary); ``ctxaware report`` shows it in each section. ``started`` and
``finished`` are UTC ISO times; ``seconds`` is the wall time when the caller passes ``started_at``.
"""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import time
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout the package runs from (``+dirty`` with local changes); None if not a checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed
        return None


def utc(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def provenance(started_at: float | None = None, **extra) -> dict:
    """Version, commit, libraries, host and time; ``started_at`` (a ``time.time()``) adds start and duration."""
    from ctxaware import __version__

    now = time.time()
    out = {
        "ctxaware_version": __version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "host": platform.node(),
        "finished": utc(now),
    }
    if started_at is not None:
        out["started"] = utc(started_at)
        out["seconds"] = round(now - started_at, 1)
    return out | extra
