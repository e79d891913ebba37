"""One results writer for every long run: JSONL rows, resumable, atomic, fingerprinted.

A run writes ``rows.jsonl`` one row per finished unit of work (an NIH cell, a QA example, a scored turn),
flushed and fsynced as it goes, plus ``meta.json`` holding the run's configuration fingerprint. Rerunning
the same command opens the same directory, reads the keys already done and skips them. A run whose
configuration differs from the one on disk is refused rather than mixed in. A torn last line (a run
killed mid-write) is dropped and rewritten; nothing else is ever overwritten.

Summaries and other whole files are written with `write_json_atomic` (temp file + ``os.replace``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ctxaware.errors import CtxawareError


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def fingerprint(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Rows of a JSONL file; a torn last line (from a killed run) is skipped."""
    path = Path(path)
    if not path.is_file():
        return
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # only the last line of a killed run can be torn; it is rewritten on resume


class ResultsWriter:
    """Append-only JSONL rows keyed by ``key_fields``; reopening resumes.

    Example::

        with ResultsWriter(out_dir, config={"model": m, "grid": g}, key_fields=("length", "depth")) as w:
            for cell in cells:
                if w.done(cell):
                    continue
                w.write({**cell, "recall": r})
    """

    def __init__(
        self,
        directory: str | Path,
        config: dict[str, Any],
        key_fields: Iterable[str],
        filename: str = "rows.jsonl",
    ) -> None:
        self.dir = Path(directory)
        self.path = self.dir / filename
        self.key_fields = tuple(key_fields)
        self.config = config
        self.fingerprint = fingerprint(config)
        self.dir.mkdir(parents=True, exist_ok=True)
        # One writer per results file: a second process on the same file would duplicate rows.
        self._lock = (self.dir / f".{filename}.lock").open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise CtxawareError(
                f"another process is writing {self.path}; wait for it to finish or use another --output"
            ) from None
        meta_path = self.dir / "meta.json"
        if meta_path.is_file():
            old = json.loads(meta_path.read_text())
            if old.get("fingerprint") != self.fingerprint:
                changed = sorted(
                    k
                    for k in set(old.get("config", {})) | set(config)
                    if old.get("config", {}).get(k) != config.get(k)
                )
                raise CtxawareError(
                    f"{self.dir} holds results of a different configuration (differs in: {', '.join(changed) or '?'}); "
                    "use another --output directory, or delete it to start over"
                )
        else:
            write_json_atomic(meta_path, {"fingerprint": self.fingerprint, "config": config})
        self._done: set[tuple] = set()
        self.rows: list[dict] = []
        self._repair_and_load()
        self._f = self.path.open("a")

    def _repair_and_load(self) -> None:
        if not self.path.is_file():
            return
        raw = self.path.read_bytes()
        good_end = raw.rfind(b"\n") + 1  # keep only complete lines
        if good_end < len(raw):
            with self.path.open("r+b") as f:
                f.truncate(good_end)
        for row in read_jsonl(self.path):
            k = self.key(row)
            if k not in self._done:
                self._done.add(k)
                self.rows.append(row)

    def key(self, row: dict) -> tuple:
        try:
            return tuple(json.dumps(row[k], sort_keys=True) for k in self.key_fields)
        except KeyError as e:
            raise CtxawareError(
                f"result row lacks key field {e}; rows need {', '.join(self.key_fields)}"
            ) from None

    def done(self, row_or_key: dict) -> bool:
        return self.key(row_or_key) in self._done

    def __len__(self) -> int:
        return len(self._done)

    def write(self, row: dict) -> None:
        """Append one finished row (durably). Writing a key twice is a no-op."""
        k = self.key(row)
        if k in self._done:
            return
        self._f.write(json.dumps(row, default=str) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._done.add(k)
        self.rows.append(row)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SkipCounter:
    """Counts rows skipped for a reason, so that a long run never drops input silently."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def skip(self, reason: str, where: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 5 and where:
            ex.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": dict(self.examples)}
