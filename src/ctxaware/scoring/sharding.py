"""Multi-process runs of ``ctxaware score``: rank and world size, the global batch plan, the merge, gloo.

Launchers (``torchrun``, ``accelerate launch``) set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``.
Every rank computes the same deterministic plan of batches and scores those with ``index % world == rank``
into its own part file; rank 0 merges the parts by key. A gloo process group (CPU tensors, so the same on
GPU hosts) gives a barrier and adds up the throughput; without ``MASTER_ADDR`` (plain processes with
``RANK``/``WORLD_SIZE`` set by hand) rank 0 waits on the files instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ctxaware.core.distributed import wait_for_rows
from ctxaware.core.results import ResultsWriter


def plan_batches(lengths: Sequence[int], batch_tokens: int, max_batch: int) -> list[list[int]]:
    """Indices into ``lengths`` packed into batches, longest first; padded size B * T_max <= batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        b = batches[-1] if batches else None
        if b and len(b) < max_batch and (len(b) + 1) * lengths[b[0]] <= batch_tokens:
            b.append(i)
        else:
            batches.append([i])
    return batches


def merge_parts(work: Path, writer: ResultsWriter, expected: list[tuple], timeout: float) -> list[dict]:
    """Wait until the part files of all ranks hold a row for every ``expected`` key; return them in that order."""

    def merged(parts: list[list[dict]]) -> dict[tuple, dict]:
        rows: dict[tuple, dict] = {}
        for part in parts:
            for r in part:
                rows.setdefault(writer.key(r), r)
        return rows

    def missing(parts: list[list[dict]]) -> int:
        rows = merged(parts)
        return sum(k not in rows for k in expected)

    parts = wait_for_rows(lambda: sorted(work.glob("part-*.jsonl")), missing, timeout, "turns still unscored")
    rows = merged(parts)
    return [rows[k] for k in expected]


def all_ranks_throughput(stats: dict, grouped: bool) -> dict:
    """Throughput over all ranks (tokens scored this run / slowest rank's seconds); rank 0's alone without a group."""
    tokens, seconds = float(stats["tokens"]), float(stats["seconds"])
    if grouped:
        import torch.distributed as dist

        t = torch.tensor([tokens, seconds], dtype=torch.float64)
        dist.all_reduce(t[:1], op=dist.ReduceOp.SUM)
        dist.all_reduce(t[1:], op=dist.ReduceOp.MAX)
        tokens, seconds = t.tolist()
    return {"tokens": int(tokens), "seconds": round(seconds, 2), "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
            "ranks": "all" if grouped else "rank 0 only (no process group)"}  # fmt: skip
