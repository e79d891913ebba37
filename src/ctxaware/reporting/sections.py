"""The sections of ``ctxaware report``: one builder per kind of result directory.

Each builder reads what a command wrote (keyed on file names, tolerant of missing fields, since formats
evolve), draws its figures through `ctxaware.core.plotting` and returns a `Section` of paragraphs, tables and
figures. `ctxaware.reporting.report` finds the directories, collects provenance and writes HTML and Markdown.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctxaware.core import plotting
from ctxaware.core.results import read_jsonl
from ctxaware.core.stats import bootstrap_ci, summarize_proportion


@dataclasses.dataclass
class Section:
    """One block of the report: ``blocks`` are ``("p", text)``, ``("table", header, rows)``, ``("fig", png,
    caption)`` in reading order; ``config`` is the run's configuration (shown folded)."""

    kind: str
    title: str
    path: Path
    provenance: dict[str, str] = dataclasses.field(default_factory=dict)
    config: dict | None = None
    model: str | None = None  # when the section knows it better than its config (e.g. from the rows)
    blocks: list[tuple] = dataclasses.field(default_factory=list)

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", [str(h) for h in header], [[_cell(c) for c in r] for r in rows]))

    def fig(self, png: Path | None, caption: str) -> None:
        if png is not None and Path(png).is_file():
            self.blocks.append(("fig", Path(png), caption))


Figs = Callable[[str], Path]  # name -> a fresh PNG path in the report's figure folder


def _cell(c: Any) -> str:
    if isinstance(c, float):
        return "–" if math.isnan(c) else f"{c:.3g}"
    return "–" if c is None else str(c)


def load_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def first_row(path: Path) -> dict:
    return next(iter(read_jsonl(path)), {}) if Path(path).is_file() else {}


def ci(values: list[float]) -> tuple[float, float, float]:
    return bootstrap_ci([float(v) for v in values if v is not None])


def prop(values: list[float]) -> tuple[float, float, float]:
    """A proportion's mean and interval that does not collapse at 0 or 1 (exact or Wilson, `stats`)."""
    s = summarize_proportion([float(v) for v in values if v is not None])
    return s["mean"], s["ci_low"], s["ci_high"]


def pct(s: tuple[float, float, float] | dict | None, n: int | None = None) -> str:
    """``72.5 [68.1, 76.9]`` from ``(mean, low, high)`` or a stats dict (fractions -> percent)."""
    if not s:
        return "–"
    m, lo, hi = (s["mean"], s.get("ci_low"), s.get("ci_high")) if isinstance(s, dict) else s
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "–"
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):  # null in JSON, NaN in memory
        n = s.get("n") if isinstance(s, dict) else n
        return f"{100 * m:.1f} [{f'n={n} ' if n else ''}too few for a CI]"
    return f"{100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _num(s: Any) -> str:
    if isinstance(s, dict) and "mean" in s:
        lo, hi = s.get("ci_low"), s.get("ci_high")
        if lo is None or hi is None or lo != lo:
            return f"{s['mean']:.2f} [no CI]"
        return f"{s['mean']:.2f} [{lo:.2f}, {hi:.2f}]"
    return _cell(s)


# --------------------------------------------------------------------------------------------- NIH


def nih(d: Path, figs: Figs) -> Section:
    """NIH rows of one model: heatmap per condition, chat/plain bars with CIs and the paired difference."""
    from ctxaware.evaluation.nih import distinct_rows

    cells = [r for r in read_jsonl(d / "rows.jsonl") if "recall" in r and "length" in r and "depth" in r]
    rows = distinct_rows(cells)  # two budgets with one prompt count once
    meta = (load_json(d / "meta.json") or {}).get("config", {})
    model = next((r["model"] for r in rows if r.get("model")), None) or meta.get("model") or d.name
    by_cond: dict[str, list[dict]] = {}
    for r in rows:
        by_cond.setdefault(str(r.get("condition", r.get("mode", "?"))), []).append(r)
    title = f"Needle in a haystack: {model} ({', '.join(by_cond)})"
    s = Section("nih", title, d, config=meta or None, model=model)
    s.p(
        f"{len(rows)} tests: {len(by_cond)} conditions × lengths {sorted({r['length'] for r in rows})} tokens "
        f"× depths {sorted({r['depth'] for r in rows})} %. Recall = fraction of the needle's keywords in the "
        "answer. n counts distinct prompts (cells of one haystack"
        + (f"; {len(cells) - len(rows)} repeated cells counted once" if len(cells) > len(rows) else "")
        + "); recall: 95% Wilson CI (exact when every value is 0 or 1), all keywords and empty: 95% exact "
        "(Clopper-Pearson) CI; the paired "
        "difference: 95% paired bootstrap over cells."
    )
    table = []
    for c, rs in by_cond.items():
        table.append([c, len(rs), pct(prop([r["recall"] for r in rs]), len(rs)), pct(prop([r.get("exact") for r in rs]), len(rs)),
                      pct(prop([r.get("empty") for r in rs]), len(rs))])  # fmt: skip
    s.table(["condition", "n", "recall % [95% CI: exact when every value is 0 or 1, else Wilson]", "all keywords % [95% exact CI]", "empty % [95% exact CI]"],
            table)  # fmt: skip
    for prefix_rest, (chat, plain) in _pairs(by_cond).items():
        diff = _paired(by_cond[chat], by_cond[plain])
        conds = {
            chat: prop([r["recall"] for r in by_cond[chat]]),
            plain: prop([r["recall"] for r in by_cond[plain]]),
        }
        n = len(diff[1])
        png = plotting.paired_bars(
            conds, diff[0] if n else None, figs(f"nih_pair{prefix_rest}"),
            f"{model}: NIH recall, chat vs. plain{prefix_rest} (n={len(by_cond[chat])} per condition)",
            "keyword recall (%)", difference_label=f"chat − plain\n(paired, n={n})",
        )  # fmt: skip
        s.fig(
            png,
            f"Recall with 95% CIs; right: chat − plain on the same (template, length, depth), n={n} pairs.",
        )
        if n:
            s.p(f"Paired difference {chat} − {plain}: {pct(diff[0], n)} percentage points (n={n} pairs).")
    steer = {c: rs for c, rs in by_cond.items() if "+steer" in c}
    if steer:
        s.table(["steered condition (paper Table 1)", "alpha", "recall % [95% CI]", "n"],
                [[c, c.split("+steer")[-1], pct(prop([r["recall"] for r in rs]), len(rs)), len(rs)] for c, rs in steer.items()])  # fmt: skip
    for c, rs in by_cond.items():
        lengths, depths = sorted({r["length"] for r in rs}), sorted({r["depth"] for r in rs})
        cell: dict = {}
        for r in rs:
            cell.setdefault((r["depth"], r["length"]), []).append(r["recall"])
        grid = [[sum(cell[(dd, n)]) / len(cell[(dd, n)]) if (dd, n) in cell else float("nan") for n in lengths]
                for dd in depths]  # fmt: skip
        rec = ci([r["recall"] for r in rs])[0]
        png = plotting.nih_heatmap(
            grid,
            lengths,
            depths,
            figs(f"nih_heatmap_{c}"),
            f"{model} · {c}: recall {100 * rec:.1f}% (n={len(rs)})",
        )
        s.fig(png, f"{c}: mean keyword recall per cell (percent in each cell).")
    return s


def _pairs(by_cond: dict[str, list]) -> dict[str, tuple[str, str]]:
    """``{suffix: (chat cond, plain cond)}`` for conditions that differ only in the mode."""
    out = {}
    for c in by_cond:
        if c.startswith("chat") and "+steer" not in c:
            other = "plain" + c[len("chat") :]
            if other in by_cond:
                out[c[len("chat") :]] = (c, other)
    return out


def _paired(a: list[dict], b: list[dict]) -> tuple[tuple[float, float, float], list[float]]:
    key = lambda r: (r.get("template"), r["length"], r["depth"])  # noqa: E731
    bmap = {key(r): r["recall"] for r in b}
    diffs = [r["recall"] - bmap[key(r)] for r in a if key(r) in bmap]
    return ci(diffs), diffs


# --------------------------------------------------------------------------------------- attention

NORMALIZATIONS = {
    "raw": "raw mass per role",
    "paper": "paper (sink+user+assistant = 1)",
    "sink_excluded": "sink excluded (system+user+assistant = 1)",
}


def attention(d: Path, figs: Figs) -> Section:
    """``allocation.json`` (per condition: raw / paper / sink_excluded shares) or the older ``attention.json``."""
    name = "allocation.json" if (d / "allocation.json").is_file() else "attention.json"
    data = load_json(d / name) or {}
    entries = {data.get("model", "?"): data} if "conditions" in data else dict(data.get("models") or {})
    cfg = data.get("config") if isinstance(data.get("config"), dict) else None
    cfg = cfg or {k: data[k] for k in ("model", "layer", "n_prompts", "protocol") if k in data} or None
    title = ", ".join(map(str, entries)) or d.name
    if title != d.name:
        title += (
            f" ({d.name})"  # a trained model's directory is often just `model`; its run folder says which
        )
    s = Section("attention", f"Attention per role: {title}", d, config=cfg)
    s.p("Attention of the query token (the last prompt token) on each role, at the retrieval head of the "
        "analysis layer, averaged over prompts; three normalisations side by side.")  # fmt: skip
    for model, e in entries.items():
        conds = e.get("conditions") or {}
        shares: dict[str, dict[str, dict]] = {}
        for norm, old in (("raw", "absolute"), ("paper", "renormalised"), ("sink_excluded", None)):
            for c in ("plain", "chat"):
                v = (conds.get(c) or {}).get(norm) or ((e.get(old) or {}).get(c) if old else None)
                if isinstance(v, dict) and v:
                    shares.setdefault(NORMALIZATIONS[norm], {})[c] = v
        heads = {c: (conds.get(c) or {}).get("head") for c in conds}
        n, layer = e.get("n_prompts", "?"), e.get("layer", "?")
        missing = [v for v in NORMALIZATIONS.values() if v not in shares]
        if shares:
            png = plotting.normalization_panels(
                shares,
                figs(f"attention_{model}"),
                f"{model}: attention per role, layer {layer} (n={n} prompts)",
            )
            s.fig(
                png,
                f"{model}, layer {layer}, heads {heads or e.get('heads_per_prompt', '?')}, n={n} prompts.",
            )
            rows = []
            for norm, by_c in shares.items():
                for role in dict.fromkeys(r for v in by_c.values() for r in v):
                    p_, c_ = by_c.get("plain", {}).get(role), by_c.get("chat", {}).get(role)
                    ch = c_ - p_ if isinstance(p_, (int, float)) and isinstance(c_, (int, float)) else None
                    rows.append([norm, role, p_, c_, ch])
            s.table(["normalisation", "role", "plain", "chat", "chat − plain"], rows)
        if missing:
            s.p(f"{model}: not recorded in {name}: {', '.join(missing)}.")
        if e.get("user_change_layer_head"):
            png = plotting.head_heatmaps(
                {f"{model} (n={n})": e["user_change_layer_head"]}, figs(f"heads_{model}")
            )
            s.fig(png, "User share with template minus without, every layer × head (paper renormalisation).")
    return s


def heads(d: Path, files: list[Path], figs: Figs) -> Section:
    s = Section("heads", f"Retrieval heads: {d.name}", d)
    for f in files:
        h = load_json(f)
        s.table([f"{f.name}: layer", "heads (eq. 3)"], [[k, ", ".join(map(str, v))] for k, v in h.items()])
    return s


# --------------------------------------------------------------------------- scores and selection


def scores(d: Path, summary_file: Path, figs: Figs) -> Section:
    from ctxaware.scoring.selection import TABLE3_BETAS, format_table, ratio_table

    summ = load_json(summary_file) or {}
    data = summary_file.with_name(summary_file.name.replace(".summary.json", ".jsonl"))
    vals = [r["score"] for r in read_jsonl(data) if r.get("score") is not None]
    meta = (load_json(Path(str(data) + ".work") / "meta.json") or {}).get("config")
    s = Section("scores", f"Context-dependency scores (eq. 2): {data.name}", d, config=meta)
    keys = ("n_conversations", "n_turns", "n_scored", "n_truncated", "mean_score", "layers")
    s.table(["quantity", "value"], [[k, summ.get(k)] for k in keys if k in summ])
    tp = summ.get("throughput_rank0") or {}
    if tp:
        s.p(
            f"Throughput: {tp.get('tokens', '?')} tokens in {tp.get('seconds', '?')} s ({tp.get('tokens_per_s', '?')} tokens/s)."
        )
    if vals:
        table = ratio_table(vals)
        s.p("Paper Table 3 (fraction of scored instructions above β):\n")
        s.table(*_md_table(format_table({data.name: table})))
        s.fig(plotting.ratio_bars({f"{data.name} (n={len(vals)})": table}, figs("table3_" + data.name),
                                  f"Table 3: share above β ({data.name}, n={len(vals)} turns)"), "Table 3 ratios.")  # fmt: skip
        s.fig(plotting.score_histogram(vals, list(TABLE3_BETAS), figs("scores_" + data.name),
                                       f"Scores of {data.name} (n={len(vals)} turns)"), "Score distribution.")  # fmt: skip
    return s


def _md_table(md: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln.strip().strip("|") for ln in md.strip().splitlines() if ln.strip().startswith("|")]
    split = [[c.strip() for c in ln.split("|")] for ln in lines]
    return split[0], [r for r in split[1:] if not all(set(c) <= set("-: ") for c in r)]


def selection(d: Path, files: list[Path], figs: Figs) -> Section:
    s = Section("selection", f"Selection (beta threshold, [IND] marking): {d.name}", d)
    ratios = {}
    for f in files:
        j = load_json(f) or {}
        s.table([f"{f.name}", "value"], [[k, j.get(k)] for k in ("beta", "n_turns", "n_scored", "n_selected", "n_unscored", "ratio") if k in j])  # fmt: skip
        if isinstance(j.get("table3"), dict):
            ratios[f.name] = j["table3"]
    if ratios:
        s.fig(plotting.ratio_bars(ratios, figs("selection_" + d.name), f"Table 3: share above β ({d.name})"), "Table 3 ratios.")  # fmt: skip
    return s


def analysis(d: Path, figs: Figs) -> Section:
    j = load_json(d / "analysis.json") or {}
    s = Section("analysis", f"Score analyses: {Path(str(j.get('scores', d.name))).name}", d)
    s.p(f"{j.get('n_scored', '?')} of {j.get('n_turns', '?')} turns scored.")
    la = j.get("layer_agreement")
    if la and la.get("disagreement"):
        png = plotting.layer_disagreement_heatmap(
            la["disagreement"], la["layers"], figs("layer_agreement"),
            f"Top-{100 * la.get('top', 0.1):.0f}% disagreement between layers (n={j.get('n_scored', '?')} turns)",
        )  # fmt: skip
        s.fig(png, "Paper Fig. 5: fraction of top-scored turns selected at one layer but not the other.")
    il = j.get("instruction_lengths")
    if il:
        s.table(["instruction lengths", "statistics"], [[k, json.dumps(v)] for k, v in il.items()])
    return s


def ruler(d: Path, figs: Figs) -> Section:
    """`ctxaware ruler`: each task and length's score per condition and the paired chat - plain differences."""
    from ctxaware.core.results import read_jsonl
    from ctxaware.core.stats import fmt
    from ctxaware.evaluation.ruler import summary

    summ = summary(list(read_jsonl(d / "rows.jsonl")))
    s = Section("ruler", f"RULER-class retrieval, chat vs plain: {d.name}", d)
    s.p("Scores in percent: Clopper-Pearson (0/1 scores) or Wilson 95% intervals; paired differences with a paired "
        "bootstrap over the same examples (one haystack and its needles each). Attention: the last prompt token's "
        "share on user tokens at the analysis layer.")  # fmt: skip
    rows = []
    for key, e in summ.items():
        task, length = key.split("@")
        for c, v in e["conditions"].items():
            raw = v["raw_user_share"]["mean"] if v["raw_user_share"] else None
            rows.append(
                [task, length, c, fmt(v["score"]), "-" if raw is None else f"{raw:.3f}", v["score"]["n"]]
            )
    s.table(["task", "length", "condition", "score % [95% CI]", "raw user share", "n"], rows)
    att = lambda e, pair: e.get("paired_raw_user_share", {}).get(pair)  # noqa: E731
    s.table(["task", "length", "paired difference", "points [95% CI]", "raw user share difference [95% CI]", "n"],
            [[*k.split("@"), pair, fmt(dd), fmt(att(e, pair), pct=False, digits=3) if att(e, pair) else "-", dd["n"]]
             for k, e in summ.items() for pair, dd in e["paired"].items()])  # fmt: skip
    return s


def ruler_comparison(d: Path, figs: Figs) -> Section:
    """`ctxaware ruler --model A,B`: each later model's template cost against the first's, same contexts."""
    from ctxaware.evaluation.ruler import compare_tables

    cmp = load_json(d / "comparison.json") or {}
    s = Section("ruler", f"RULER-class retrieval, model against model: {d.name}", d)
    s.p(f"Every later model against {cmp['reference']} on the same contexts: the template's cost "
        f"({cmp['pair']}) of each, its change (the difference in differences) and each condition's change, in "
        "points with a paired bootstrap over the examples; the change of the template's shift of the raw user "
        "share, in share units.")  # fmt: skip
    for title, header, rows in compare_tables(cmp):
        s.p(title)
        if rows:
            s.table(header, rows)
    return s


# --------------------------------------------------------------------------- training and evaluation


def train(d: Path, figs: Figs) -> Section:
    summ = load_json(d / "train_summary.json") or {}
    cfg = load_json(d / "train_config.json")
    cfg = cfg.get("config", cfg) if isinstance(cfg, dict) else None
    model = (cfg or {}).get("model", "?")
    s = Section("train", f"Training: {d.name} ({model})", d, config=cfg)
    if not summ:
        s.p("No train_summary.json: the run has not finished (or was interrupted).")
    data = summ.get("data") or {}
    s.table(["quantity", "value"], [[k, v] for k, v in (
        ("global_step", summ.get("global_step")), ("train_loss", summ.get("train_loss")),
        ("examples", data.get("n_examples")), ("loss tokens", data.get("n_trainable_tokens")),
        ("wall_seconds", summ.get("wall_seconds", summ.get("wall_s"))), ("model_dir", summ.get("model_dir")))])  # fmt: skip
    losses = summ.get("losses") or []
    if losses:
        png = plotting.line_plot({"loss": ([x["step"] for x in losses], [x["loss"] for x in losses])},
                                 figs(f"loss_{d.name}"), f"{model}: training loss ({d.name})", "training step", "loss (nats/token)")  # fmt: skip
        s.fig(png, "Training loss.")
    curve = sorted(summ.get("context_reliance") or list(read_jsonl(d / "context_reliance" / "rows.jsonl")),
                   key=lambda r: r.get("step", 0))  # fmt: skip
    curve = [r for r in curve if "p_s" in r and "p_o" in r]
    if curve:
        n = (cfg or {}).get("track_n", "?")
        png = plotting.context_reliance_steps({"": curve}, figs(f"reliance_{d.name}"),
                                              f"{model}: context reliance during training (n={n} items)")  # fmt: skip
        s.fig(png, "Inversion curve: p_s (context answer) and p_o (memorised answer) against training steps.")
        s.table(["step", "p_s", "p_o"], [[r["step"], r["p_s"], r["p_o"]] for r in curve])
    return s


def _metric_table(results: dict[str, dict[str, dict]]) -> tuple[list[str], list[list[str]], dict]:
    """``results[label][task] = {kind, n, metrics{name: stats}}`` -> header, rows, bar groups."""
    tasks = list(dict.fromkeys(t for r in results.values() for t in r))
    header, rows, groups = ["run", *tasks], [], {}
    for label, res in results.items():
        row = [label]
        for t in tasks:
            m = (res.get(t) or {}).get("metrics") or {}
            shown = [
                (k, v) for k, v in m.items() if isinstance(v, dict) and "mean" in v and k not in ("empty",)
            ][:3]
            rating = (res.get(t) or {}).get("kind") == "mtbench"
            row.append(
                "; ".join(f"{k} {_num(v) if rating else pct(v)}" for k, v in shown)
                + f" (n={(res.get(t) or {}).get('n', '?')})"
            )
            for k, v in shown[:2]:
                if not rating:
                    groups.setdefault(f"{t} {k}", {})[label] = (
                        v["mean"],
                        v.get("ci_low", v["mean"]),
                        v.get("ci_high", v["mean"]),
                    )
        rows.append(row)
    return header, rows, groups  # fmt: skip


def evaluation(d: Path, figs: Figs) -> Section:
    """``summary.json`` of ``ctxaware eval`` (results[model][condition][task]) or ``results.json`` (task -> result)."""
    j = load_json(d / "summary.json") or {}
    if "results" in j:
        flat = {f"{m} [{c}]": tasks for m, conds in j["results"].items() for c, tasks in conds.items()}
    else:
        flat = {
            d.name: {k: v for k, v in (load_json(d / "results.json") or {}).items() if isinstance(v, dict)}
        }
    s = Section("eval", f"Evaluation: {', '.join(flat)}", d, config=j.get("config"))
    header, rows, groups = _metric_table(flat)
    s.table(header, rows)
    if groups:
        s.fig(plotting.bar_chart({g: {k: tuple(100 * x for x in v) for k, v in ser.items()} for g, ser in groups.items()},
                                 figs(f"eval_{d.name}"), f"Evaluation ({len(flat)} runs)", "percent (95% CI)"),
              "Metrics with 95% bootstrap CIs.")  # fmt: skip
    return s


def evaluation_task(d: Path, j: dict, figs: Figs) -> Section:
    """One task's ``summary.json`` of ``ctxaware eval`` on its own (its parent summary is missing)."""
    s = Section("eval", f"Evaluation: {d.parent.name} / {d.name}", d)
    header, rows, _ = _metric_table({d.parent.name: {d.name: j}})
    s.table(header, rows)
    return s


def experiment(d: Path, figs: Figs) -> Section:
    j = load_json(d / "comparison.json") or {}
    runs = j["runs"] if isinstance(j.get("runs"), dict) else j  # older files held the runs at the top
    s = Section("experiment", f"Experiment (paper Table 4): {d.name}", d)
    if isinstance(j.get("table3"), dict):
        s.table(["Table 3", *[f"beta={b}" for b in j["table3"]]], [["ratio selected", *j["table3"].values()]])
    flat = {
        name: {k: v for k, v in (r.get("eval") or {}).items() if isinstance(v, dict)}
        for name, r in runs.items()
    }
    header, rows, groups = _metric_table(flat)
    s.table(header, rows)
    if groups:
        s.fig(plotting.bar_chart({g: {k: tuple(100 * x for x in v) for k, v in ser.items()} for g, ser in groups.items()},
                                 figs("table4"), f"Table 4 comparison ({len(runs)} runs)", "percent (95% CI)"),
              "Table 4: each run's metrics with 95% CIs.")  # fmt: skip
    sel = [[n, r["selection"].get("beta"), r["selection"].get("n_selected"), r["selection"].get("n_scored"),
            r["selection"].get("ratio")] for n, r in runs.items() if isinstance(r.get("selection"), dict)]  # fmt: skip
    if sel:
        s.table(["run", "beta", "selected", "scored", "ratio"], sel)
    nih = [[n, c, _num(v.get("recall")), v.get("n")] for n, r in runs.items()
           for c, v in (r.get("nih") or {}).items() if isinstance(v, dict)]  # fmt: skip
    if nih:
        s.table(["run", "NIH condition", "recall (95% CI)", "n"], nih)
    att = [[n, c, v.get("head"), _num(v["paper"]["user"]), _num(v["sink_excluded"]["user"])]
           for n, r in runs.items() for c, v in ((r.get("attention") or {}).get("conditions") or {}).items()
           if isinstance(v, dict) and "paper" in v]  # fmt: skip
    if att:
        s.table(["run", "condition", "head", "paper user share", "sink-excluded user share"], att)
    curves = {
        n: r["train"]["context_reliance"]
        for n, r in runs.items()
        if (r.get("train") or {}).get("context_reliance")
    }
    if curves:
        s.fig(plotting.context_reliance_steps(curves, figs("experiment_reliance"), "Context reliance during training, every run"),
              "Inversion curves of every run: p_s solid, p_o dashed.")  # fmt: skip
    return s


# ------------------------------------------------------------------------------------------ stages


def stages(d: Path, f: Path, figs: Figs) -> Section:
    """``summary.json`` of ``ctxaware stages``: usage per checkpoint, sensitivities, head-level change."""
    from ctxaware.evaluation.stages import summary_blocks

    j = load_json(f) or {}
    cfg = j.get("config") if isinstance(j.get("config"), dict) else None
    s = Section("stages", f"Training stages: {d.name}", d, config=cfg,
                model=", ".join(cfg.get("checkpoints", [])) if cfg else None)  # fmt: skip
    if not isinstance(j.get("usage"), dict):
        s.p(
            f"{f.name}: no per-checkpoint usage found (keys: {', '.join(map(str, j)) or 'none'}); listed only."
        )
        return s
    for kind, *rest in summary_blocks(j):
        if kind == "p":
            s.p(rest[0])
        else:
            s.table(*rest)
    if isinstance(j.get("sensitivity"), dict) and j["sensitivity"]:
        s.fig(plotting.stage_sensitivity(j["sensitivity"], figs("stages_sensitivity")),
              "Standardised coefficient of each context characteristic per usage measure, one bar per checkpoint (95% CI).")  # fmt: skip
    s.fig(
        d / "head_change.png",
        "Head-level change of the sink-excluded context share between consecutive checkpoints.",
    )
    return s
