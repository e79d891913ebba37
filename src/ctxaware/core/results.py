"""One results writer for every long run: JSONL rows, resumable, atomic, fingerprinted.

A run writes ``rows.jsonl`` one row per finished unit of work (an NIH cell, a QA example, a scored turn),
flushed and fsynced as it goes, plus ``meta.json`` holding the run's configuration fingerprint. Rerunning
the same command opens the same directory, reads the keys already done and skips them. A run whose
configuration differs from the one on disk is refused rather than mixed in. A torn last line (a run
killed mid-write) is dropped and rewritten; nothing else is ever overwritten.

Summaries and other whole files are written with `write_json_atomic` (temp file + ``os.replace``), with
the same permissions as any file the user creates (umask), like the rows.

Resume compares contents, not names (docs/resume.md): `fingerprint_inputs` replaces every input path in
a run's configuration by a hash of the file's (or directory's) bytes, resolves model aliases
(``default`` = ``smollm2-135m-instruct``) and fingerprints model directories by their files, so a dataset
or ``heads.json`` edited in place is refused, while the same input spelled differently is accepted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ctxaware.core.errors import CtxawareError


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def make_user_readable(fd: int) -> None:
    """Give a ``tempfile.mkstemp`` file (created 0600) the mode a plain ``open`` would: 0666 & ~umask."""
    os.fchmod(fd, 0o666 & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed onto ``path`` when the block ends without an
    error, removed otherwise: readers see the old file or the new one, never half of one, and an earlier
    file survives a failure (a full disk included). The file gets the mode a plain ``open`` gives (umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    try:
        make_user_readable(fd)
        os.close(fd)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``path.write_text(text)`` through `atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN and infinity replaced by ``None``: strict JSON (``null``), which every parser
    reads, where Python would write the bare ``NaN`` that strict parsers reject. Where a number is missing
    for a reason, the writer puts the reason beside it (``stats.summarize``: ``no_ci``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, **kw) -> str:
    """``json.dumps`` of `json_safe` ``obj``, strict (``allow_nan=False``): the one JSON encoder of outputs."""
    return json.dumps(json_safe(obj), allow_nan=False, default=str, **kw)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON so that readers see the old file or the new one, never half of one."""
    return write_text_atomic(path, dumps(obj, indent=2) + "\n")


def fingerprint(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- content fingerprints

_SAMPLE_ABOVE = 64 * 2**20  # files larger than this are fingerprinted by size + 64 sampled 1 MiB blocks
_BLOCK, _N_BLOCKS = 2**20, 64
_MAX_DIR_FILES = 10_000
_digest_cache: dict[tuple, str] = {}
MODEL_KEYS = ("model", "score_model", "judge_local_model", "base_model")
NOT_INPUT_KEYS = ("output", "output_dir", "data_dir", "judge_model", "judge_url", "device")


def file_digest(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes (files over 64 MiB: its size and 64 evenly spaced 1 MiB blocks,
    which include the first and the last; a retrained safetensors file differs in every block)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key in _digest_cache:
        return _digest_cache[key]
    h = hashlib.sha256()
    with p.open("rb") as f:
        if st.st_size <= _SAMPLE_ABOVE:
            for block in iter(lambda: f.read(_BLOCK), b""):
                h.update(block)
        else:
            h.update(f"size={st.st_size}".encode())
            step = (st.st_size - _BLOCK) / (_N_BLOCKS - 1)
            for i in range(_N_BLOCKS):
                f.seek(int(i * step))
                h.update(f.read(_BLOCK))
    _digest_cache[key] = out = f"sha256:{h.hexdigest()}"
    return out


def dir_digest(path: str | Path, recursive: bool = True) -> str:
    """``sha256:<hex>`` over the relative names and `file_digest` of the files in a directory (hidden files,
    lock files and, for a model directory, subdirectories such as ``checkpoint-*`` left out)."""
    root = Path(path)
    files = root.rglob("*") if recursive else root.iterdir()
    h, n = hashlib.sha256(), 0
    for f in sorted(x for x in files if x.is_file()):
        rel = f.relative_to(root).as_posix()
        if any(part.startswith(".") for part in rel.split("/")) or rel.endswith(".lock"):
            continue
        n += 1
        if n > _MAX_DIR_FILES:
            raise CtxawareError(f"{root} holds more than {_MAX_DIR_FILES} files; point to the input itself")
        h.update(f"{rel}\0{file_digest(f)}\n".encode())
    return f"sha256:{h.hexdigest()}"


def model_fingerprint(spec: str) -> str:
    """What a model spec loads: ``builtin:<name>`` with aliases resolved (``default``), the content digest
    of a ``.gguf`` file or a model directory's files, else the spec itself (a hub id; its ``revision`` is
    fingerprinted separately). Comma-separated lists are fingerprinted item by item."""
    from ctxaware.core.models import BUILTIN_MODELS, canonical_spec

    parts = []
    for s in (x.strip() for x in str(spec).split(",")):
        name = canonical_spec(s)
        p = Path(name).expanduser()
        if name in BUILTIN_MODELS:
            parts.append(f"builtin:{name}")
        elif p.is_file():
            parts.append(file_digest(p))
        elif p.is_dir():
            parts.append(dir_digest(p, recursive=False))
        else:
            parts.append(name)
    return ",".join(parts)


def _input_value(key: str, value: Any) -> Any:
    if isinstance(value, list):
        return [_input_value(key, v) for v in value]
    if not isinstance(value, str) or not value:
        return value
    if key in MODEL_KEYS:
        return model_fingerprint(value)
    if key in NOT_INPUT_KEYS or "output" in key:
        return os.path.normpath(os.path.abspath(os.path.expanduser(value))) if "output" in key else value
    p = Path(value).expanduser()
    if ("/" in value or "." in value) and p.exists():
        try:
            return file_digest(p) if p.is_file() else dir_digest(p)
        except OSError as e:
            raise CtxawareError(f"cannot read input {value} ({key}): {e.strerror or e}") from None
    return value


def fingerprint_inputs(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with every input named by path replaced by a digest of its contents (files, directories
    such as a haystack), model specs by `model_fingerprint`, output paths made absolute. Two configs that
    read the same bytes compare equal, however the paths are spelled; an input edited in place does not."""
    return {k: _input_value(k, v) for k, v in config.items()}


def config_changes(old_config: dict, old_inputs: dict | None, config: dict) -> list[str]:
    """The keys in which ``config`` differs from a saved run (contents compared, see `fingerprint_inputs`).

    ``old_inputs`` is the saved run's `fingerprint_inputs`; a run saved before contents were recorded
    (``None``) is compared by normalised values, and options it did not know are accepted. An option added
    to ctxaware after a run was saved is accepted when it is unset (None, False or empty): the run was made
    without it (a new ``peft_adapter: null`` does not block the resume of an older run)."""
    now = fingerprint_inputs(config)
    if old_inputs is not None:
        unset = lambda k: k not in old_inputs and now.get(k) in (None, False, [], "")  # noqa: E731
        return sorted(
            k for k in set(old_inputs) | set(now) if old_inputs.get(k) != now.get(k) and not unset(k)
        )
    changed = []
    for k in set(old_config) | set(config):
        if k not in old_config:
            continue
        if k not in config:
            changed.append(k)
        elif old_config[k] != config[k] and fingerprint_inputs({k: old_config[k]})[k] != now[k]:
            changed.append(k)
    return sorted(changed)


def run_record(config: dict[str, Any]) -> dict[str, Any]:
    """``{"fingerprint", "config", "inputs"}``: what a run records of its configuration so that a rerun is
    compared by contents (`config_changes` against ``record["config"]`` and ``record["inputs"]``)."""
    inputs = fingerprint_inputs(config)
    return {"fingerprint": fingerprint(inputs), "config": config, "inputs": inputs}


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> Path:
    """Rows as JSONL, written to a temporary name and renamed when complete (readers never see half a file,
    and an earlier file survives a failure)."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        f.writelines(dumps(r) + "\n" for r in rows)
    return Path(path)


def read_jsonl(path: str | Path, bad: SkipCounter | None = None, markers: bool = False) -> Iterator[dict]:
    """The object rows of a JSONL file (``.gz`` too; a UTF-8 BOM is read, not counted): the one JSONL reader.

    Its one policy for a bad line: a line that is not valid JSON (a torn last line from a killed run, a
    line edited by hand) or not an object is skipped and counted, never a crash and never dropped
    silently: in ``bad`` when the caller keeps the count, else said on stderr when the file is read through.
    ``markers``: yield ``{"_malformed": reason}`` in its place instead, for loaders that count bad lines with
    their other bad rows (`tasks.load_examples`)."""
    import gzip

    path = Path(path)
    if not path.is_file():
        return
    counter = bad if bad is not None else SkipCounter()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
                why = None if isinstance(row, dict) else "is not a JSON object"
            except json.JSONDecodeError:
                why = "is not valid JSON"
            if why is None:
                yield row
            elif markers:
                yield {"_malformed": f"line {why}"}
            else:
                counter.skip(f"line {why}", where=f"{path.name}:{i}")
    if bad is None and counter.total:
        why = ", ".join(f"{n} x {r}" for r, n in counter.counts.items())
        print(f"ctxaware: note: {counter.total} malformed line(s) in {path} skipped ({why})", file=sys.stderr)


def take_lock(lock_path: Path, what: Path | str):
    """An exclusive, non-blocking ``flock`` on ``lock_path`` (released when the returned file is closed, or
    by the OS when the process dies); a second writer gets a one-line `CtxawareError`."""
    f = Path(lock_path).open("w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise CtxawareError(
            f"another process is writing {what}; wait for it to finish or use another output"
        ) from None
    return f


@contextlib.contextmanager
def exclusive(directory: str | Path, name: str = ".ctxaware.lock"):
    """One writer per output directory for commands that do not write through `ResultsWriter` (``train``,
    ``experiment``): the lock that ``ResultsWriter`` takes, on the directory as a whole."""
    d = Path(directory)
    created = not d.exists()
    d.mkdir(parents=True, exist_ok=True)
    f = take_lock(d / name, d)
    try:
        yield d
    finally:
        if created and [p.name for p in d.iterdir()] == [name]:  # a run that wrote nothing leaves nothing
            (d / name).unlink()
            d.rmdir()
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def row_key(row: dict, key_fields: Iterable[str]) -> tuple:
    """A result row's identity: its key fields as canonical JSON (what `ResultsWriter` and the ranks of a
    launch compare)."""
    return tuple(json.dumps(row[k], sort_keys=True) for k in key_fields)


SCHEMA = 1  # the version of meta.json and of the rows' layout; readers (`ctxaware report`) check it


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
        about: dict[str, Any] | None = None,
        kind: str = "rows",
    ) -> None:
        self.dir = Path(directory)
        self.path = self.dir / filename
        self.key_fields = tuple(key_fields)
        self.config = config
        record = run_record(config)
        self.inputs, self.fingerprint = record["inputs"], record["fingerprint"]
        self.dir.mkdir(parents=True, exist_ok=True)
        # One writer per results file: a second process on the same file would duplicate rows.
        self._lock = take_lock(self.dir / f".{filename}.lock", self.path)
        meta_path = self.dir / "meta.json"
        from ctxaware.core.provenance import provenance

        # where the rows came from (command, versions, commit, model revision, template hash): recorded, never
        # compared (a resume under another version is allowed, and appends its own provenance)
        made = provenance(**(about or {}))
        made["started"] = made.pop("finished")  # written when the run (or its resume) starts
        meta = {"kind": kind, "schema": SCHEMA, **record, "provenance": made}
        if meta_path.is_file():
            try:
                old = json.loads(meta_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                self._lock.close()
                raise CtxawareError(
                    f"{meta_path} is not valid JSON; delete {self.dir} to start over, or use another --output"
                ) from None
            if not isinstance(old, dict) or not isinstance(old.get("config", {}), dict):
                self._lock.close()
                raise CtxawareError(
                    f"{meta_path} is not the metadata of a ctxaware run (edited by hand?); delete {self.dir} to "
                    "start over, or use another --output"
                )
            changed = config_changes(old.get("config", {}), old.get("inputs"), config)
            if changed:
                self._lock.close()
                raise CtxawareError(
                    f"{self.dir} holds results of a different configuration or of other input contents "
                    f"(differs in: {', '.join(changed)}); use another --output directory, or delete it to start over"
                )
            if "inputs" not in old:  # a run from before contents were recorded: record them now
                write_json_atomic(meta_path, meta)
            else:
                resumes = old.get("resumed_by") if isinstance(old.get("resumed_by"), list) else []
                write_json_atomic(meta_path, {**old, "resumed_by": [*resumes, made]})
        else:
            write_json_atomic(meta_path, meta)
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
        bad = SkipCounter()
        for row in read_jsonl(self.path, bad):
            if any(k not in row for k in self.key_fields):
                bad.skip("row lacks a key field", where=self.path.name)
                continue
            k = self.key(row)
            if k not in self._done:
                self._done.add(k)
                self.rows.append(row)
        self.malformed = bad
        if bad.total:  # the torn last line of a killed run was cut above; anything else is said
            print(f"ctxaware: note: {bad.total} malformed line(s) in {self.path} skipped "
                  f"({', '.join(f'{n} x {r}' for r, n in bad.counts.items())}); their work is redone",
                  file=sys.stderr)  # fmt: skip

    def key(self, row: dict) -> tuple:
        try:
            return row_key(row, self.key_fields)
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
        row = json_safe(row)  # the row kept in memory is the row a resumed run reads back
        self._f.write(json.dumps(row, allow_nan=False, default=str) + "\n")  # `dumps`, already made safe
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


# Units of work that failed for a reason outside the input (an unreachable judge, a refused API key) are
# not written as finished rows: they are counted here and redone when the same command runs again. The
# CLI reports the count on stderr and exits 1 when it is not zero.
INCOMPLETE = SkipCounter()


def leave_for_next_run(reason: str, where: str = "") -> None:
    """Record one unit of work left unfinished (not written), to be redone by the next run."""
    INCOMPLETE.skip(reason, where)
