"""Confidence intervals: every mean that ctxaware reports comes with a 95% bootstrap interval."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_ci(
    values: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its percentile-bootstrap interval (NaNs for no values)."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    a = (1 - confidence) / 2
    return float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def summarize(values: Sequence[float], **kw) -> dict:
    """``{"mean", "ci_low", "ci_high", "n"}`` for JSON summaries."""
    m, lo, hi = bootstrap_ci(values, **kw)
    return {"mean": m, "ci_low": lo, "ci_high": hi, "n": len(values)}


def fmt(s: dict, pct: bool = True) -> str:
    """``"72.5 [68.1, 76.9]"`` for tables (percent by default)."""
    k = 100.0 if pct else 1.0
    return f"{s['mean'] * k:.1f} [{s['ci_low'] * k:.1f}, {s['ci_high'] * k:.1f}]"
