"""Confidence intervals: every mean that ctxaware reports comes with a 95% interval, and says which.

* A proportion of binary outcomes (containment, p_s, p_o, exact match, all-keywords recall): the exact
  Clopper-Pearson interval (`proportion_ci`), which does not collapse at 0 % or 100 % (100/100 gives
  [96.4, 100]) and is valid at any n.
* A mean of values bounded in [0, 1] that are not all 0 or 1 (NIH keyword recall: sevenths): the Wilson
  score interval of the mean over n. It is conservative for such values, whose variance is at most
  p (1 - p), and it does not collapse at 0 % or 100 % either.
* Any other mean, and every paired difference: the percentile bootstrap over the rows (`bootstrap_ci`).
  Below `MIN_N_FOR_CI` values a percentile bootstrap is meaningless (four identical values give the
  "interval" [100, 100]); the bounds are then NaN and tables say ``[n=4 too small for a CI]``.

Every summary carries ``interval``: ``clopper-pearson``, ``wilson`` or ``bootstrap``.
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
    """``{"mean", "ci_low", "ci_high", "n", "interval"}`` with the percentile bootstrap (bounds NaN when
    n < `MIN_N_FOR_CI`): for means that are not proportions, and for paired differences."""
    m, lo, hi = bootstrap_ci(values, **kw)
    n = len([v for v in values if v is not None])
    out = {"mean": m, "ci_low": lo, "ci_high": hi, "n": n, "interval": "bootstrap"}
    if n < kw.get("min_n", MIN_N_FOR_CI):  # the reason, beside the null bounds of the JSON files
        out["no_ci"] = "no values" if n == 0 else f"n={n} is too few for a bootstrap CI (< {MIN_N_FOR_CI})"
    return out


def proportion_ci(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of ``k`` successes in ``n`` trials (scipy's ``binomtest``)."""
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def wilson_ci(p: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``p`` observed over ``n`` trials."""
    from scipy.stats import norm

    z = float(norm.ppf(1 - (1 - confidence) / 2))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize_proportion(values: Sequence[float], confidence: float = 0.95) -> dict:
    """A mean of values in [0, 1] with an interval that does not collapse at 0 or 1: Clopper-Pearson when
    every value is 0 or 1, else Wilson on the mean (conservative for bounded values). Values outside [0, 1]
    are an error (use `summarize`)."""
    x = [float(v) for v in values if v is not None]
    n = len(x)
    if n == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0,
                "interval": "clopper-pearson", "no_ci": "no values"}  # fmt: skip
    if any(v < 0 or v > 1 for v in x):
        raise ValueError("summarize_proportion needs values in [0, 1]")
    mean = sum(x) / n
    if all(v in (0.0, 1.0) for v in x):
        lo, hi = proportion_ci(round(mean * n), n, confidence)
        kind = "clopper-pearson"
    else:
        lo, hi = wilson_ci(mean, n, confidence)
        kind = "wilson"
    return {"mean": mean, "ci_low": lo, "ci_high": hi, "n": n, "interval": kind}


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
