"""Many processes, one result: the ranks of a ``torchrun`` / ``accelerate launch`` run share a command's
units of work and rank 0 writes the merged rows (issue 25 section 2).

Every rank computes the same ordered list of units (an NIH engine call: one length and alpha; a QA chunk)
from the same inputs and the same finished rows, takes the units with ``index % world == rank`` and writes
their rows through its own `ResultsWriter` under ``OUTPUT/.ranks/rank-R/`` (resumable and fingerprinted
like any run). Rank 0 waits until every rank's rows are there (a gloo barrier when a launcher set
``MASTER_ADDR``, else by reading the files) and appends them to the run's own rows file unit by unit, in
the order one process writes them, then removes the ranks' files. A unit is computed whole on one rank, beside the same companions as in
one process (same batches, same prefix cache), so the merged file is byte-identical to a one-process run
on the same input.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ctxaware.core.errors import CtxawareError
from ctxaware.core.results import ResultsWriter, read_jsonl, row_key

if TYPE_CHECKING:
    import torch


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun / accelerate launch environment variables (``(0, 1)`` alone)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def process_group(world: int) -> bool:
    """Join a gloo process group when a launcher (torchrun, accelerate launch) set ``MASTER_ADDR``.

    gloo runs on CPU tensors on any host, so the same group serves CPU and GPU runs; it is used only for a
    barrier before the merge and to add up throughput. Without it rank 0 still merges by waiting on files.
    """
    import torch.distributed as dist

    if world < 2 or "MASTER_ADDR" not in os.environ or not dist.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return True


def finished_keys(path: Path, key_fields: Sequence[str]) -> Callable[[dict], bool]:
    """``done(cell)`` over a run's rows file read as it is now (ranks other than 0 never open its writer)."""
    rows = read_jsonl(path) if path.is_file() else []
    keys = {row_key(r, key_fields) for r in rows if all(k in r for k in key_fields)}
    return lambda cell: row_key(cell, key_fields) in keys


def launch_writer(
    directory: str | Path, config: dict, key_fields: Sequence[str], **kw
) -> tuple[ResultsWriter | None, Callable[[dict], bool]]:
    """A run's writer and its ``done(cell)``: rank 0 (or one process) opens the run's `ResultsWriter`
    (``kw``: its ``about``, ``kind``); another rank of a launch gets ``None`` and ``done`` over the run's rows
    file as it is now (only rank 0 writes it). The caller closes the writer."""
    if dist_info()[0] != 0:
        return None, finished_keys(Path(directory) / "rows.jsonl", key_fields)
    writer = ResultsWriter(directory, config, key_fields, **kw)
    return writer, writer.done


def poll(missing: Callable[[], int], timeout: float, what: str) -> None:
    """Return once ``missing()`` is 0, checking with a back-off (0.5 s up to 30 s); after ``timeout`` seconds
    a one-line error says how many of ``what`` are still missing."""
    t0, wait = time.time(), 0.5
    while n := missing():
        if time.time() - t0 > timeout:
            raise CtxawareError(f"{n} {what} after {timeout:.0f}s; rerun the same command to resume")
        time.sleep(wait)
        wait = min(30.0, wait * 1.5)


def wait_for_rows(
    files: Callable[[], Sequence[Path]], missing: Callable[[list[list[dict]]], int], timeout: float, what: str
) -> list[list[dict]]:
    """The rows of ``files()`` (one list per file, in file order) once ``missing(rows)`` is 0: other ranks'
    files are reread with `poll`'s back-off (a reread is O(rows))."""
    rows: list[list[dict]] = []

    def count() -> int:
        rows[:] = [list(read_jsonl(f)) if f.is_file() else [] for f in files()]
        return missing(rows)

    poll(count, timeout, what)
    return rows


def rank_dir(output: str | Path, rank: int) -> Path:
    """Where rank ``rank`` writes its rows of a sharded run."""
    return Path(output) / ".ranks" / f"rank-{rank}"


def run_units(
    writer: ResultsWriter | None,
    output: str | Path,
    units: Sequence[list[dict]],
    compute: Callable[[int, ResultsWriter], None],
    config: dict,
    key_fields: Sequence[str],
    about: dict | None = None,
    kind: str = "rows",
    timeout: float = 86400.0,
) -> None:
    """Run ``units`` (each the list of the cells it writes, in writing order) over the ranks of this launch.

    One process (``WORLD_SIZE`` unset or 1): ``compute(i, writer)`` for every unit, into ``writer``. Several:
    rank R computes its units into its own writer under `rank_dir`; rank 0 (``writer`` is its run writer,
    ``None`` on the other ranks) then copies every unit's rows into ``writer`` in unit order. ``compute(i, w)``
    writes unit ``i``'s rows to ``w`` in the order one process writes them."""
    rank, world = dist_info()
    if world < 2:
        for i in range(len(units)):
            compute(i, writer)  # type: ignore[arg-type]
        return
    grouped = process_group(world)
    mine = ResultsWriter(rank_dir(output, rank), config, key_fields, about={**(about or {}), "rank": rank,
                         "world_size": world}, kind=kind)  # fmt: skip
    with mine:
        for i in range(rank, len(units), world):
            if not all(mine.done(c) for c in units[i]):  # a killed launch resumes its ranks' units
                compute(i, mine)
    if grouped:
        import torch.distributed as dist

        dist.barrier()  # every rank's rows are written
    if rank != 0:
        return
    assert writer is not None, "rank 0 writes the merged rows"
    files = [rank_dir(output, r) / "rows.jsonl" for r in range(world)]

    def missing(ranks: list[list[dict]]) -> int:  # every unit's rows in the file of the rank that computed it
        keys = [{writer.key(row) for row in rows} for rows in ranks]
        return sum(writer.key(c) not in keys[i % world] for i, u in enumerate(units) for c in u)

    ranks = wait_for_rows(lambda: files, missing, timeout, "result(s) of other ranks still missing")
    for i, u in enumerate(units):  # unit by unit, each in its rank's writing order (one process's order)
        wanted = {writer.key(c) for c in u}
        for row in ranks[i % world]:
            if writer.key(row) in wanted:
                writer.write(row)  # a row the run already held is not written twice
    shutil.rmtree(Path(output) / ".ranks", ignore_errors=True)  # merged: the run's own file holds every row


def shard_tensors(
    output: str | Path, name: str, n: int, compute: Callable[[int], torch.Tensor], timeout: float = 86400.0
) -> list[torch.Tensor] | None:
    """``[compute(i) for i in range(n)]``, the ``n`` items shared by the ranks of this launch (a forward pass
    per batch: `ctxaware.attention.allocation.role_allocation`).

    One process: computed in order, returned. Several: rank R computes items ``i % world == R`` and saves each
    as ``rank_dir(output, R)/{name}-{i}.safetensors`` (atomic; an item already saved is not recomputed, so a
    killed launch resumes); rank 0 waits for every item, loads them in order, removes the files and returns
    them; the other ranks return ``None``. Each item is computed whole on one rank, as in one process, so the
    result is the one-process result."""
    from safetensors.torch import load_file, save_file

    rank, world = dist_info()
    if world < 2:
        return [compute(i) for i in range(n)]
    process_group(world)
    print(
        f"{name}: rank {rank} of {world} computes {len(range(rank, n, world))} of the {n} items", flush=True
    )
    path = lambda i: rank_dir(output, i % world) / f"{name}-{i}.safetensors"  # noqa: E731
    for i in range(rank, n, world):
        if not path(i).is_file():
            path(i).parent.mkdir(parents=True, exist_ok=True)
            tmp = path(i).with_suffix(".tmp")
            save_file({"t": compute(i).contiguous()}, str(tmp))
            os.replace(tmp, path(i))
    if rank != 0:
        return None
    poll(
        lambda: sum(not path(i).is_file() for i in range(n)),
        timeout,
        f"{name} item(s) of other ranks missing",
    )
    out = [load_file(str(path(i)))["t"] for i in range(n)]
    for i in range(n):
        path(i).unlink()
    return out


def wait_for_merge(
    output: str | Path, cells: Sequence[dict], key_fields: Sequence[str], timeout: float = 86400.0
) -> None:
    """On ranks other than 0, after `run_units`: wait until rank 0 has merged every cell's row into
    ``output/rows.jsonl`` (the ranks read the merged rows next). Rank 0 and one process return at once."""
    rank, world = dist_info()
    if world < 2 or rank == 0:
        return
    rows = Path(output) / "rows.jsonl"

    def missing() -> int:
        done = finished_keys(rows, key_fields)
        return sum(not done(c) for c in cells)

    poll(missing, timeout, "row(s) not yet merged by rank 0")
