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

COMMAND: list[str] = []  # the command line of the running ``ctxaware`` command (set by `ctxaware.cli`)


def model_about(model, tok) -> dict:
    """What identifies a loaded model beyond its name: the resolved hub revision (``_commit_hash``; None for
    local files) and the SHA-256 of the chat template the run renders with."""
    import hashlib

    template = getattr(tok, "chat_template", None)
    return {
        "model_revision": getattr(getattr(model, "config", None), "_commit_hash", None),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()
        if isinstance(template, str)
        else None,
    }


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
        "command": COMMAND or None,
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "trl": _version("trl"),
        "peft": _version("peft"),
        "host": platform.node(),
        "finished": utc(now),
    }
    if started_at is not None:
        out["started"] = utc(started_at)
        out["seconds"] = round(now - started_at, 1)
    return out | extra
