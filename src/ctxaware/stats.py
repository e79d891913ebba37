"""Confidence intervals: every mean that ctxaware reports comes with a 95% bootstrap interval.

Below `MIN_N_FOR_CI` values a percentile bootstrap is meaningless (four identical values give the
"interval" [100, 100]); the bounds are then NaN and tables say ``[n=4 too small for a CI]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MIN_N_FOR_CI = 10


def bootstrap_ci(
    values: Sequence[float],
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    min_n: int = MIN_N_FOR_CI,
) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its percentile-bootstrap interval (NaN for no values; NaN
    bounds for fewer than ``min_n`` values, too few for an interval)."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    if x.size < min_n:
        return float(x.mean()), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    a = (1 - confidence) / 2
    return float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def summarize(values: Sequence[float], **kw) -> dict:
    """``{"mean", "ci_low", "ci_high", "n"}`` for JSON summaries (bounds NaN when n < `MIN_N_FOR_CI`)."""
    m, lo, hi = bootstrap_ci(values, **kw)
    return {"mean": m, "ci_low": lo, "ci_high": hi, "n": len([v for v in values if v is not None])}


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt(s: dict, pct: bool = True, digits: int = 1) -> str:
    """``"72.5 [68.1, 76.9]"`` for tables (percent by default, ``digits`` decimals); ``"100.0 [n=4 too
    small for a CI]"`` when there are too few values for an interval."""
    k = 100.0 if pct else 1.0
    if _nan(s.get("mean")):
        return "-"
    if _nan(s.get("ci_low")) or _nan(s.get("ci_high")):
        return f"{s['mean'] * k:.{digits}f} [n={s.get('n', '?')} too small for a CI]"
    return f"{s['mean'] * k:.{digits}f} [{s['ci_low'] * k:.{digits}f}, {s['ci_high'] * k:.{digits}f}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; ``|`` and newlines inside cells are escaped so that a cell stays one cell."""

    def cell(c: object) -> str:
        return str(c).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, r)) + " |" for r in rows])
