"""The one plotting module: every PNG that ctxaware writes comes from a function here.

Matplotlib with the Agg backend (no display needed); each function takes plain numbers, writes one PNG
and returns its path. Modules add their figure functions here rather than setting up matplotlib themselves.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def bar_chart(
    groups: dict[str, dict[str, tuple[float, float, float]]], path: str | Path, title: str, ylabel: str
) -> Path:
    """Grouped bars with error bars: ``groups[group][series] = (mean, low, high)``."""
    import numpy as np

    names = list(groups)
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names) * max(1, len(series)) / 2), 4))
    x = np.arange(len(names))
    for j, s in enumerate(series):
        vals = [groups[g].get(s, (np.nan, np.nan, np.nan)) for g in names]
        m = np.array([v[0] for v in vals])
        err = np.array([[v[0] - v[1] for v in vals], [v[2] - v[0] for v in vals]])
        ax.bar(x + (j - (len(series) - 1) / 2) * width, m, width, yerr=err, capsize=3, label=s)
    ax.set_xticks(x, names, rotation=15, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)
