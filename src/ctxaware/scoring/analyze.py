"""Analyses of context-dependency scores: layer agreement (paper App. B.4, Fig. 5) and instruction lengths of
the original vs. the selected subset (App. B.6, Fig. 6-8).

Layer agreement: every turn of a sample is scored at every layer in one pass (``ctxaware score DATA
--layers 0,1,...,N-1`` captures all layers in a single forward). For each layer l the top 10% of turns by
score form S_l; the disagreement of layers l and l' is |S_l minus S_l'| / |S_l|, the fraction of S_l that
S_l' does not select (symmetric, since |S_l| = |S_l'|). Ties are broken by input order.

Instruction lengths: the token length of the user instruction X_m of every scored turn, for all turns and
for the selected ones (s > beta; when no turn passes beta, for the top 10% instead, and the JSON says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctxaware.core import plotting
from ctxaware.core.config import Checked
from ctxaware.core.errors import CtxawareError
from ctxaware.core.results import read_jsonl, write_json_atomic
from ctxaware.data.conversations import load_conversations


@dataclass
class AnalyzeConfig(Checked):
    """Layer-agreement heatmap (Fig. 5) and instruction-length distributions (Fig. 6-8) of a scores file.

    Parameters:
        scores: JSONL from ``ctxaware score`` (with ``--layers`` for the layer agreement).
        data: the dataset that was scored, for instruction lengths (optional).
        model: tokenizer used to measure instruction lengths in tokens.
        top: fraction of turns selected per layer for the agreement heatmap (paper: 0.1).
        beta: selection threshold for the length distributions.
        output: directory for ``layer_agreement.png``, ``instruction_lengths.png`` and ``analysis.json``.
    """

    scores: str = field(
        metadata={"path": "input_file", "help": "scores JSONL from ctxaware score", "positional": True}
    )
    data: str | None = field(
        default=None, metadata={"path": "input", "help": "the scored dataset, for instruction lengths"}
    )
    model: str = field(default="default", metadata={"help": "tokenizer for instruction lengths"})
    top: float = field(default=0.1, metadata={"help": "top fraction of turns per layer (Fig. 5)"})
    beta: float = field(
        default=0.6, metadata={"help": "selection threshold for the length plots", "min": 0, "max": 1}
    )
    name: str = field(default="", metadata={"help": "dataset name for plot titles (default: file name)"})
    output: str = field(default="runs/analysis", metadata={"path": "output_dir", "help": "output directory"})
    limit: int | None = field(
        default=None, metadata={"min": 1, "help": "rows read from data (as when scoring)"}
    )


def top_set(keys: list[tuple], scores: list[float], top: float) -> set[tuple]:
    """The ceil(top * n) keys with the highest scores (ties: earlier key first)."""
    k = max(1, math.ceil(top * len(keys)))
    order = sorted(range(len(keys)), key=lambda i: (-scores[i], i))
    return {keys[i] for i in order[:k]}


def layer_disagreement(rows: list[dict], top: float = 0.1) -> tuple[list[int], np.ndarray]:
    """Layers and the (L, L) disagreement matrix of their top-``top`` selections (paper Fig. 5)."""
    rows = [r for r in rows if r.get("scores")]
    if not rows:
        raise CtxawareError("the scores have no per-layer scores; score with --layers 0,1,...,N-1 first")
    layers = sorted(int(k) for k in rows[0]["scores"])
    keys = [(r["source_row"], r["turn"]) for r in rows]
    sets = [top_set(keys, [r["scores"][str(layer)] for r in rows], top) for layer in layers]
    k = len(sets[0])
    mat = np.array([[len(a - b) / k for b in sets] for a in sets])  # (L, L)
    return layers, mat


def instruction_lengths(rows: list[dict], data: str, tok, limit: int | None) -> dict[tuple[int, int], int]:
    """Token length of X_m for every (source_row, turn) of the dataset."""
    convs, _ = load_conversations(data, limit=limit)
    out = {}
    for c in convs:
        users = [m["content"] for m in c.messages if m["role"] == "user"]
        for m, text in enumerate(users):
            out[(c.source_row, m)] = len(tok(text, add_special_tokens=False)["input_ids"])
    return out


def _describe(x: list[int]) -> dict:
    if not x:
        return {"n": 0}
    a = np.asarray(x)
    return {"n": len(x), "mean": float(a.mean()), "median": float(np.median(a)),
            "p10": float(np.quantile(a, 0.1)), "p90": float(np.quantile(a, 0.9))}  # fmt: skip


def length_analysis(rows: list[dict], lengths: dict, beta: float, top: float) -> dict:
    """Instruction lengths of all scored turns vs the selected ones (s > beta, else the top fraction)."""
    scored = [r for r in rows if r["score"] is not None and (r["source_row"], r["turn"]) in lengths]
    keys = [(r["source_row"], r["turn"]) for r in scored]
    chosen = {k for k, r in zip(keys, scored) if r["score"] > beta}
    rule = f"score > {beta}"
    if not chosen and scored:
        chosen, rule = (
            top_set(keys, [r["score"] for r in scored], top),
            f"top {top:.0%} (no turn has score > {beta})",
        )
    return {
        "selection": rule,
        "original": _describe([lengths[k] for k in keys]),
        "selected": _describe([lengths[k] for k in keys if k in chosen]),
        "_series": {
            "original": [lengths[k] for k in keys],
            "selected": [lengths[k] for k in keys if k in chosen],
        },
    }


def run(cfg: AnalyzeConfig) -> dict:
    """Write the plots and ``analysis.json``; return the numbers."""
    raw = list(read_jsonl(cfg.scores))
    rows = [r for r in raw if isinstance(r, dict) and "score" in r and "source_row" in r and "turn" in r]
    if not rows:
        raise CtxawareError(
            f"{cfg.scores} holds no score rows ({len(raw)} rows without score, source_row and turn); "
            "give the JSONL that ctxaware score wrote"
        )
    if len(rows) < len(raw):
        print(f"note: {len(raw) - len(rows)} of {len(raw)} rows are not score rows and were skipped")
    out, name = Path(cfg.output), cfg.name or Path(cfg.data or cfg.scores).name
    result: dict = {
        "scores": cfg.scores,
        "n_turns": len(rows),
        "n_scored": sum(r["score"] is not None for r in rows),
    }
    ok = [r for r in rows if r["score"] is not None]
    if ok and ok[0].get("scores"):
        layers, mat = layer_disagreement(ok, cfg.top)
        result["layer_agreement"] = {"layers": layers, "top": cfg.top, "disagreement": mat.round(4).tolist()}
        plotting.layer_disagreement_heatmap(
            mat.tolist(), layers, out / "layer_agreement.png", f"{name}: top-{cfg.top:.0%} disagreement"
        )
    if cfg.data:
        from ctxaware.core.models import load_tokenizer

        lengths = instruction_lengths(rows, cfg.data, load_tokenizer(cfg.model), cfg.limit)
        la = length_analysis(rows, lengths, cfg.beta, cfg.top)
        series = la.pop("_series")
        plotting.length_histograms(
            {"original": series["original"], f"selected ({la['selection']})": series["selected"]},
            out / "instruction_lengths.png", f"{name}: instruction lengths", "instruction length (tokens)",
        )  # fmt: skip
        result["instruction_lengths"] = la
    write_json_atomic(out / "analysis.json", result)
    return result


def _off(m: np.ndarray) -> float:
    """Mean of the off-diagonal entries."""
    return float(m[~np.eye(len(m), dtype=bool)].mean())
