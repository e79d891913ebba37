"""The one plotting module: every PNG that ctxaware writes comes from a function here.

Each function takes plain numbers, writes one PNG and returns its path. Figures are made outside pyplot
(``matplotlib.figure.Figure``: no backend chosen, no display needed, nothing for pyplot to keep), and the
house style (`STYLE`) applies inside each function only (``matplotlib.rc_context``): importing ctxaware
changes no global matplotlib state, so a notebook's own figures and its inline backend are untouched.
Modules add their figure functions here rather than setting up matplotlib themselves.
"""

from __future__ import annotations

import functools
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

# One palette for every figure (Okabe-Ito, readable by colour-blind readers): a condition, a role or a run
# has the same colour in every plot of a report.
PALETTE = {
    "chat": "#0072B2",
    "plain": "#E69F00",
    "difference": "#009E73",
    "bos": "#999999",
    "system": "#CC79A7",
    "user": "#0072B2",
    "assistant": "#D55E00",
    "template": "#F0E442",
    "sink": "#555555",
}
CYCLE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
DPI = 130  # a 6.4-inch figure is ~830 px wide: fits a page, stays sharp
STYLE = {
    "axes.prop_cycle": matplotlib.cycler(color=CYCLE),
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
}


def _styled(fn):
    """Run a figure function inside the house style (`STYLE`), leaving the global rcParams as they were."""

    @functools.wraps(fn)
    def wrapper(*args, **kw):
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kw)

    return wrapper


def _subplots(*args, figsize=None, **kw):
    """Subplots without pyplot: a `Figure` that no backend or figure manager holds."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kw)


def _finite(x: float) -> float:
    """0 for NaN or ``None`` (a CI bound that was not computed because n was too small: ``null`` in the JSON
    files), else ``x``."""
    return 0.0 if x is None or x != x else x


def color(name: str, i: int = 0) -> str:
    """The palette colour of a condition or role (``chat+prefix`` -> chat), else the ``i``-th cycle colour."""
    key = name.split("+")[0].split(" ")[0].lower()
    return PALETTE.get(key, CYCLE[i % len(CYCLE)])


def _wrap_titles(fig) -> None:
    """Wrap every axes title and the figure's suptitle to the width it has, so that no title runs past the
    edge of the image (a long panel title was cut off, issue 27 section 3)."""
    import textwrap

    width_in = fig.get_figwidth()
    texts = [(ax.title, ax.get_position().width * width_in) for ax in fig.axes]
    if getattr(fig, "_suptitle", None) is not None:
        texts.append((fig._suptitle, width_in))
    for text, inches in texts:
        label = text.get_text()
        if not label:
            continue
        chars = max(12, int(inches * 72 / (0.6 * text.get_fontsize())))  # an average glyph: 0.6 em
        text.set_text("\n".join(textwrap.fill(line, chars) for line in label.split("\n")))


def _save(fig, path: str | Path) -> Path:
    from ctxaware.core.results import atomic_path

    path = Path(path)
    _wrap_titles(fig)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # an earlier figure survives a failed save
        fig.savefig(tmp, dpi=DPI, format=path.suffix.lstrip(".") or "png")
    return path


@_styled
def bar_chart(
    groups: dict[str, dict[str, tuple[float, float, float]]], path: str | Path, title: str, ylabel: str
) -> Path:
    """Grouped bars with error bars: ``groups[group][series] = (mean, low, high)``."""
    import numpy as np

    names = list(groups)
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    width = 0.8 / max(1, len(series))
    fig, ax = _subplots(figsize=(max(5, 1.6 * len(names) * max(1, len(series)) / 2), 4))
    x = np.arange(len(names))
    for j, s in enumerate(series):
        vals = np.array(
            [[np.nan if v is None else v for v in groups[g].get(s, (np.nan,) * 3)] for g in names], float
        )
        m, lo, hi = vals.T
        xs = x + (j - (len(series) - 1) / 2) * width
        ax.bar(xs, np.nan_to_num(m), width, label=s)
        ok = np.isfinite(lo) & np.isfinite(hi)  # no caps where there is no CI (n too small): none is drawn
        if ok.any():
            ax.errorbar(
                xs[ok], m[ok], yerr=[m[ok] - lo[ok], hi[ok] - m[ok]], fmt="none", ecolor="k", capsize=3
            )
    ax.set_xticks(x, names, rotation=15, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


@_styled
def context_reliance_curve(
    checkpoints: list[str],
    series: dict[str, list[tuple[float, float, float]]],
    path: str | Path,
    title: str = "Context reliance over training",
) -> Path:
    """p_s / p_o (mean, low, high) per checkpoint, one line with a CI band per series: the rise-then-fall
    of p_s is context-parametric inversion. ``series[name][i]`` belongs to ``checkpoints[i]``."""
    import numpy as np

    fig, ax = _subplots(figsize=(max(5, 0.9 * len(checkpoints) + 2), 4))
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


@_styled
def context_reliance_steps(
    series: dict[str, list[dict]], path: str | Path, title: str = "Context reliance during fine-tuning"
) -> Path:
    """p_s (context answer, solid) and p_o (memorised answer, dashed) against training steps;
    ``series[name] = [{step, p_s, p_o}, ...]`` (one colour per series, e.g. vanilla vs. +indicator)."""
    fig, ax = _subplots(figsize=(6, 4))
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


@_styled
def role_change_bars(change: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Paper Fig. 3: ``change[model][role]`` = share with template minus share without, per role."""
    import numpy as np

    models, roles = list(change), list(next(iter(change.values())))
    width = 0.8 / len(roles)
    fig, ax = _subplots(figsize=(max(4.5, 1.8 * len(models)), 3.6))
    x = np.arange(len(models))
    for j, r in enumerate(roles):
        ax.bar(x + (j - (len(roles) - 1) / 2) * width, [change[m][r] for m in models], width, label=r)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, models, rotation=10)
    ax.set_ylabel("share with template − without")
    ax.set_title("Attention allocation change (retrieval head)")
    ax.legend(fontsize=8)
    return _save(fig, path)


@_styled
def role_share_bars(shares: dict[str, dict[str, dict[str, float]]], path: str | Path) -> Path:
    """Paper Fig. 4: stacked ``shares[model][run][role]`` (run = plain / chat) summing to 1."""
    import numpy as np

    labels = [f"{m}\n{run}" for m in shares for run in shares[m]]
    vals = [shares[m][run] for m in shares for run in shares[m]]
    roles = list(vals[0])
    fig, ax = _subplots(figsize=(max(4.5, 1.1 * len(labels)), 3.6))
    bottom = np.zeros(len(labels))
    for r in roles:
        v = np.array([d[r] for d in vals])
        ax.bar(labels, v, bottom=bottom, label=r)
        bottom += v
    ax.set_ylabel("attention share (renormalised)")
    ax.set_title("Attention allocation, without vs. with template")
    ax.legend(fontsize=8)
    return _save(fig, path)


@_styled
def head_heatmaps(
    maps: dict[str, list[list[float]]], path: str | Path, title: str = "user share: with template − without"
) -> Path:
    """One layer x head heatmap per panel (diverging, centred at 0): a change of the user share, between
    conditions (with template - without) or between checkpoints (`stage_head_change`)."""
    import numpy as np

    fig, axes = _subplots(1, len(maps), figsize=(3.2 * len(maps) + 0.8, 4.2), squeeze=False)
    for ax, (name, m) in zip(axes[0], maps.items()):
        a = np.asarray(m)
        lim = float(np.abs(a).max()) or 1.0
        im = ax.imshow(a, aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim, origin="lower")
        ax.grid(False)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


@_styled
def nih_heatmap(
    recall: list[list[float]],
    lengths: list[int],
    depths: list[float],
    path: str | Path,
    title: str,
    annotate: bool | None = None,
) -> Path:
    """NIH heatmap like the original test's (paper Sec. 2.1): ``recall[depth][length]``, red (0) to green (1).

    Cells show their recall in percent when the grid is small enough to read (``annotate=None``: up to 12 x 12).
    """
    import numpy as np

    a = np.asarray(recall, dtype=float)
    nd, nl = a.shape
    annotate = (nd <= 12 and nl <= 12) if annotate is None else annotate
    fig, ax = _subplots(figsize=(max(8.0, 1.6 + 0.55 * nl), max(5.0, 1.4 + 0.4 * nd)))  # >= 1040 px wide
    im = ax.imshow(100 * a, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")  # percent, as the cells read
    ax.grid(False)
    ax.set_xticks(
        range(nl), [str(n) for n in lengths], rotation=45 if nl > 8 else 0, ha="right" if nl > 8 else "center"
    )
    ax.set_yticks(range(nd), [f"{d:g}" for d in depths])
    if annotate:
        for i in range(nd):
            for j in range(nl):
                if np.isfinite(a[i, j]):
                    ax.text(j, i, f"{100 * a[i, j]:.0f}", ha="center", va="center", fontsize=8,
                            color="black" if 0.25 < a[i, j] < 0.85 else "white")  # fmt: skip
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth (% of context)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.05, label="keyword recall (%)")
    return _save(fig, path)


@_styled
def layer_disagreement_heatmap(
    matrix: list[list[float]], layers: list[int], path: str | Path, title: str
) -> Path:
    """Paper Fig. 5: ``matrix[i][j]`` = fraction of top-scored turns selected at layer ``layers[i]`` but not
    at ``layers[j]``."""
    import numpy as np

    n = len(layers)
    fig, ax = _subplots(figsize=(max(5, 0.28 * n + 2), max(4.2, 0.26 * n + 1.5)))
    im = ax.imshow(np.asarray(matrix, dtype=float), cmap="viridis", vmin=0, vmax=1, origin="lower")
    ax.grid(False)
    step = max(1, n // 15)
    ax.set_xticks(range(0, n, step), [str(x) for x in layers[::step]])
    ax.set_yticks(range(0, n, step), [str(x) for x in layers[::step]])
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="disagreement (fraction of top-10% turns)")
    return _save(fig, path)


@_styled
def length_histograms(series: dict[str, list[int]], path: str | Path, title: str, xlabel: str) -> Path:
    """Paper Fig. 6-8: overlaid density histograms of lengths (log-spaced bins), one per series."""
    import numpy as np

    vals = [v for s in series.values() for v in s if v > 0]
    bins = np.logspace(0, np.log10(max(vals + [10])) + 0.05, 30)
    fig, ax = _subplots(figsize=(6, 4))
    for name, s in series.items():
        if s:
            ax.hist([max(1, v) for v in s], bins=bins, density=True, alpha=0.5, label=f"{name} (n={len(s)})")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


# --- report figures (ctxaware report) ------------------------------------------------------------------------


@_styled
def paired_bars(
    conditions: dict[str, tuple[float, float, float]],
    difference: tuple[float, float, float] | None,
    path: str | Path,
    title: str,
    ylabel: str,
    difference_label: str = "chat − plain (paired)",
) -> Path:
    """Left: one bar per condition with its 95% CI; right: the paired difference with its CI (``(mean, low,
    high)`` each, fractions in [0, 1], shown in percent)."""
    names = list(conditions)
    ncols = 2 if difference is not None else 1
    fig, axes = _subplots(
        1, ncols, figsize=(max(6.8, 1.1 * len(names) + 3.5), 3.8), squeeze=False,
        gridspec_kw={"width_ratios": [max(2, len(names)), 1.2][:ncols]},
    )  # fmt: skip
    ax = axes[0][0]
    m = [100 * conditions[n][0] for n in names]
    err = [  # no bar where n is too small for a CI (NaN bounds)
        [_finite(100 * (v[0] - v[1])) for v in conditions.values()],
        [_finite(100 * (v[2] - v[0])) for v in conditions.values()],
    ]
    ax.bar(names, m, yerr=err, capsize=4, color=[color(n, i) for i, n in enumerate(names)])
    for i, v in enumerate(m):
        ax.text(i, v + err[1][i] + 1.5, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=15 if len(names) > 3 else 0)
    if difference is not None:
        d = axes[0][1]
        dm = 100 * difference[0]
        d.bar([difference_label], [dm], yerr=[[_finite(dm - 100 * difference[1])], [_finite(100 * difference[2] - dm)]],
              capsize=4, color=PALETTE["difference"])  # fmt: skip
        d.axhline(0, color="k", lw=0.8)
        d.set_ylabel("difference (percentage points)")
        lim = max(10.0, abs(dm), *(_finite(abs(100 * x)) for x in difference[1:])) * 1.15
        d.set_ylim(-lim, lim)
        d.text(0.05, dm / 2, f"{dm:+.1f}", ha="left", va="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


@_styled
def normalization_panels(
    shares: dict[str, dict[str, dict[str, float]]], path: str | Path, title: str
) -> Path:
    """Attention per role in several normalisations side by side: ``shares[normalisation][condition][role]``;
    one panel per normalisation, bars grouped by role, one colour per condition."""
    import numpy as np

    norms = list(shares)
    fig, axes = _subplots(1, len(norms), figsize=(2.9 * len(norms) + 0.5, 3.4), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        conds = list(shares[norm])
        roles = list(dict.fromkeys(r for c in conds for r in shares[norm][c]))
        width = 0.8 / max(1, len(conds))
        x = np.arange(len(roles))
        for j, c in enumerate(conds):
            v = [shares[norm][c].get(r, np.nan) for r in roles]
            ax.bar(x + (j - (len(conds) - 1) / 2) * width, v, width, label=c, color=color(c, j))
        ax.set_xticks(x, roles, rotation=20 if len(roles) > 3 else 0)
        ax.set_ylim(0, 1)
        ax.set_title(norm)
        ax.set_ylabel("share of attention (0-1)")
    axes[0][0].legend()
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


@_styled
def ratio_bars(table: dict[str, dict[str, float]], path: str | Path, title: str) -> Path:
    """Paper Table 3: ``table[dataset][beta]`` = fraction of scored instructions with score > beta."""
    import numpy as np

    names = list(table)
    betas = list(dict.fromkeys(b for r in table.values() for b in r))
    width = 0.8 / max(1, len(names))
    fig, ax = _subplots(figsize=(max(5.0, 1.2 * len(betas) + 2), 3.6))
    x = np.arange(len(betas))
    for j, n in enumerate(names):
        v = [100 * table[n].get(b, np.nan) for b in betas]
        bars = ax.bar(x + (j - (len(names) - 1) / 2) * width, v, width, label=n)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, [f"β = {b}" for b in betas])
    ax.set_ylabel("instructions with score > β (%)")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


@_styled
def score_histogram(scores: list[float], betas: list[float], path: str | Path, title: str) -> Path:
    """Distribution of context-dependency scores (eq. 2) with the thresholds β marked."""
    fig, ax = _subplots(figsize=(6, 3.4))
    ax.hist(scores, bins=30, range=(0, 1), color=CYCLE[0], alpha=0.85)
    for b in betas:
        ax.axvline(b, color="k", ls=":", lw=1)
        ax.text(b, ax.get_ylim()[1] * 0.95, f" β={b:g}", fontsize=7, va="top")
    ax.set_xlabel("context-dependency score s (eq. 2, 0-1)")
    ax.set_ylabel("assistant turns")
    ax.set_title(title)
    return _save(fig, path)


@_styled
def layer_curves(
    panels: dict[str, dict[str, list[tuple[float, float, float]]]],
    layers: list[int],
    path: str | Path,
    title: str,
) -> Path:
    """One panel per entry of ``panels``; in each, one line per series with its CI band: ``(mean, low, high)``
    per layer (NaN bounds, too few prompts for a CI, draw no band). A zero line in difference panels."""
    import numpy as np

    fig, axes = _subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        for i, (label, vals) in enumerate(series.items()):
            m, lo, hi = (np.array(v, dtype=float) for v in zip(*vals))
            ax.plot(layers, m, marker=".", label=label, color=color(label, i))
            if not (np.isnan(lo).any() or np.isnan(hi).any()):
                ax.fill_between(layers, lo, hi, alpha=0.2, color=color(label, i))
        if "difference" in series:
            ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel("layer")
        ax.set_title(name, fontsize=9)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


@_styled
def line_plot(
    series: dict[str, tuple[list[float], list[float]]], path: str | Path, title: str, xlabel: str, ylabel: str
) -> Path:
    """Plain lines: ``series[name] = (xs, ys)`` (e.g. the training loss against steps)."""
    fig, ax = _subplots(figsize=(6, 3.4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    return _save(fig, path)


# --- stage study (`ctxaware stages`) ------------------------------------------------------------------------


@_styled
def stage_sensitivity(sens: dict[str, dict[str, dict]], path: str | Path) -> Path:
    """Effect of each context characteristic across stages: ``sens[checkpoint][usage][characteristic]`` =
    ``{coef, ci_low, ci_high}`` (standardised coefficients), one panel per usage measure, 95% CIs as bars."""
    import numpy as np

    ckpts = list(sens)
    usages = list(next(iter(sens.values()))) if ckpts else []
    chars = [c for c in (next(iter(sens[ckpts[0]].values())) if ckpts else {}) if not c.startswith("_")]
    fig, axes = _subplots(
        1, max(1, len(usages)), figsize=(3.0 * max(1, len(usages)) + 0.6, 3.6), squeeze=False
    )
    width = 0.8 / max(1, len(ckpts))
    x = np.arange(len(chars))
    for ax, u in zip(axes[0], usages):
        for j, ck in enumerate(ckpts):
            d = sens[ck][u]
            ys = np.array([np.nan if d[c]["coef"] is None else d[c]["coef"] for c in chars], float)
            lo = np.array([np.nan if d[c]["ci_low"] is None else d[c]["ci_low"] for c in chars], float)
            hi = np.array([np.nan if d[c]["ci_high"] is None else d[c]["ci_high"] for c in chars], float)
            err = np.vstack([np.nan_to_num(ys - lo), np.nan_to_num(hi - ys)])
            ax.bar(
                x + (j - (len(ckpts) - 1) / 2) * width,
                np.nan_to_num(ys),
                width,
                yerr=err,
                capsize=2,
                label=ck,
                color=CYCLE[j % len(CYCLE)],
            )
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, [c.replace("_", "\n") for c in chars], fontsize=7)
        ax.set_title(f"{u} (n={d.get('_n', {}).get('n', '?')})")
    axes[0][0].set_ylabel("standardised coefficient (95% CI)")
    axes[0][-1].legend(fontsize=7)
    return _save(fig, path)


def stage_head_change(maps: dict[str, list[list[float]]], path: str | Path) -> Path:
    """Layer x head change of the sink-excluded user attention share between consecutive checkpoints."""
    return head_heatmaps(maps, path, "user share (sink-excluded): later − earlier checkpoint")
