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


def context_reliance_curve(
    checkpoints: list[str],
    series: dict[str, list[tuple[float, float, float]]],
    path: str | Path,
    title: str = "Context reliance over training",
) -> Path:
    """p_s / p_o (mean, low, high) per checkpoint, one line with a CI band per series: the rise-then-fall
    of p_s is context-parametric inversion. ``series[name][i]`` belongs to ``checkpoints[i]``."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(checkpoints) + 2), 4))
    x = np.arange(len(checkpoints))
    for name, vals in series.items():
        m, lo, hi = (np.array(v) for v in zip(*vals))
        ax.plot(x, m, marker="o", label=name, linestyle="--" if "p_o" in name else "-")
        ax.fill_between(x, lo, hi, alpha=0.15)
    ax.set_xticks(x, checkpoints, rotation=15, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("rate (p_s: context answer, p_o: memorised answer)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def context_reliance_steps(
    series: dict[str, list[dict]], path: str | Path, title: str = "Context reliance during fine-tuning"
) -> Path:
    """p_s (context answer, solid) and p_o (memorised answer, dashed) against training steps;
    ``series[name] = [{step, p_s, p_o}, ...]`` (one colour per series, e.g. vanilla vs. +indicator)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for j, (name, rows) in enumerate(series.items()):
        steps = [r["step"] for r in rows]
        label = f"{name} " if name else ""
        ax.plot(steps, [r["p_s"] for r in rows], "-o", color=f"C{j}", ms=3, label=f"{label}p_s (context)")
        ax.plot(steps, [r["p_o"] for r in rows], "--s", color=f"C{j}", ms=3, label=f"{label}p_o (memory)")
    ax.set_xlabel("training step")
    ax.set_ylabel("fraction of answers")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


# --- attention allocation (paper Fig. 3-4) ---------------------------------------------------------------


def role_change_bars(change: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Paper Fig. 3: ``change[model][role]`` = share with template minus share without, per role."""
    import numpy as np

    models, roles = list(change), list(next(iter(change.values())))
    width = 0.8 / len(roles)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.8 * len(models)), 3.6))
    x = np.arange(len(models))
    for j, r in enumerate(roles):
        ax.bar(x + (j - (len(roles) - 1) / 2) * width, [change[m][r] for m in models], width, label=r)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, models, rotation=10)
    ax.set_ylabel("share with template − without")
    ax.set_title("Attention allocation change (retrieval head)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def role_share_bars(shares: dict[str, dict[str, dict[str, float]]], path: str | Path) -> Path:
    """Paper Fig. 4: stacked ``shares[model][run][role]`` (run = plain / chat) summing to 1."""
    import numpy as np

    labels = [f"{m}\n{run}" for m in shares for run in shares[m]]
    vals = [shares[m][run] for m in shares for run in shares[m]]
    roles = list(vals[0])
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(labels)), 3.6))
    bottom = np.zeros(len(labels))
    for r in roles:
        v = np.array([d[r] for d in vals])
        ax.bar(labels, v, bottom=bottom, label=r)
        bottom += v
    ax.set_ylabel("attention share (renormalised)")
    ax.set_title("Attention allocation, without vs. with template")
    ax.legend(fontsize=8)
    return _save(fig, path)


def head_heatmaps(maps: dict[str, list[list[float]]], path: str | Path) -> Path:
    """One layer x head heatmap per model (diverging, centred at 0): e.g. change of user share."""
    import numpy as np

    fig, axes = plt.subplots(1, len(maps), figsize=(3.2 * len(maps) + 0.8, 4.2), squeeze=False)
    for ax, (name, m) in zip(axes[0], maps.items()):
        a = np.asarray(m)
        lim = float(np.abs(a).max()) or 1.0
        im = ax.imshow(a, aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim, origin="lower")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle("user share: with template − without", fontsize=10)
    return _save(fig, path)


def nih_heatmap(
    recall: list[list[float]], lengths: list[int], depths: list[float], path: str | Path, title: str
) -> Path:
    """NIH heatmap like the original test's (paper Sec. 2.1): ``recall[depth][length]``, red (0) to green (1)."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(lengths), 1.2 + 0.3 * len(depths)))
    im = ax.imshow(np.asarray(recall, dtype=float), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth (%)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05, label="keyword recall")
    return _save(fig, path)


def layer_disagreement_heatmap(
    matrix: list[list[float]], layers: list[int], path: str | Path, title: str
) -> Path:
    """Paper Fig. 5: ``matrix[i][j]`` = fraction of top-scored turns selected at layer ``layers[i]`` but not
    at ``layers[j]``."""
    import numpy as np

    n = len(layers)
    fig, ax = plt.subplots(figsize=(max(5, 0.28 * n + 2), max(4.2, 0.26 * n + 1.5)))
    im = ax.imshow(np.asarray(matrix, dtype=float), cmap="viridis", vmin=0, vmax=1, origin="lower")
    step = max(1, n // 15)
    ax.set_xticks(range(0, n, step), [str(x) for x in layers[::step]])
    ax.set_yticks(range(0, n, step), [str(x) for x in layers[::step]])
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="disagreement (fraction of top-10% turns)")
    return _save(fig, path)


def length_histograms(series: dict[str, list[int]], path: str | Path, title: str, xlabel: str) -> Path:
    """Paper Fig. 6-8: overlaid density histograms of lengths (log-spaced bins), one per series."""
    import numpy as np

    vals = [v for s in series.values() for v in s if v > 0]
    bins = np.logspace(0, np.log10(max(vals + [10])) + 0.05, 30)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in series.items():
        if s:
            ax.hist([max(1, v) for v in s], bins=bins, density=True, alpha=0.5, label=f"{name} (n={len(s)})")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)
