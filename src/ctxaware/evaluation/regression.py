"""Sensitivity of context usage to context characteristics: standardised OLS coefficients with
percentile-bootstrap CIs, and Spearman rank correlations.

A standardised coefficient is the OLS slope after z-scoring the outcome and every regressor: the change in
the outcome, in standard deviations, per standard deviation of one characteristic with the others held
fixed. CIs resample examples (rows) with replacement. A column with no variance (in the data or in a
resample) gets ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _z(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sd = a.std(axis=0)
    ok = sd > 1e-12
    return (a - a.mean(axis=0)) / np.where(ok, sd, 1.0), ok


def standardized_coefficients(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(P,) standardised OLS coefficients of ``y`` (N,) on ``X`` (N, P); NaN for constant columns or y."""
    X, y = np.asarray(X, float), np.asarray(y, float)
    zx, ok = _z(X)
    zy, oky = _z(y[:, None])
    out = np.full(X.shape[1], np.nan)
    if not oky[0] or not ok.any() or X.shape[0] <= ok.sum():
        return out
    coef, *_ = np.linalg.lstsq(zx[:, ok], zy[:, 0], rcond=None)
    out[ok] = coef
    return out


def _ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), as Spearman's rho needs."""
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(len(a), dtype=float)
    vals = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and vals[j + 1] == vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (Pearson correlation of average ranks); ``None`` when either side is constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _clean(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def sensitivity(
    X: np.ndarray,
    y: np.ndarray,
    names: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict]:
    """``{name: {coef, ci_low, ci_high, spearman}}`` plus ``_n``: the regression of ``y`` on all of ``X``."""
    X, y = np.asarray(X, float), np.asarray(y, float)
    keep = np.isfinite(y) & np.isfinite(X).all(axis=1)
    X, y = X[keep], y[keep]
    too_few = len(y) <= X.shape[1] + 1  # an exact fit (or none): coefficients would be noise, not estimates
    coef = np.full(X.shape[1], np.nan) if too_few else standardized_coefficients(X, y)
    rng = np.random.default_rng(seed)
    boots = (
        np.array([standardized_coefficients(X[i], y[i]) for i in rng.integers(0, len(y), (n_boot, len(y)))])
        if len(y) > X.shape[1] + 1
        else np.full((1, X.shape[1]), np.nan)
    )
    a = (1 - confidence) / 2
    out: dict[str, dict] = {}
    for j, name in enumerate(names):
        b = boots[:, j][np.isfinite(boots[:, j])]
        lo, hi = np.quantile(b, [a, 1 - a]) if b.size >= 10 else (np.nan, np.nan)
        out[name] = {
            "coef": _clean(coef[j]),
            "ci_low": _clean(lo),
            "ci_high": _clean(hi),
            "spearman": spearman(X[:, j], y) if len(y) else None,
        }
    out["_n"] = {"n": int(len(y)), "dropped": int((~keep).sum())}
    if too_few:
        out["_n"]["no_fit"] = (
            f"{len(y)} rows for {X.shape[1]} predictors: too few for a regression (need more than {X.shape[1] + 1})"
        )
    return out
