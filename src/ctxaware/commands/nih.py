"""``ctxaware nih``: the command line of `ctxaware.evaluation.nih` (parse, run, print)."""

from __future__ import annotations

import json
from pathlib import Path

from ctxaware.core import plotting
from ctxaware.core.config import parse_config
from ctxaware.core.distributed import dist_info
from ctxaware.core.errors import CtxawareError
from ctxaware.core.models import run_id
from ctxaware.core.results import write_json_atomic, write_text_atomic
from ctxaware.evaluation.nih import (
    NIHConfig,
    _dump,
    check,
    preflight,
    report,
    run_model,
    steering_table,
    table,
)


def main(argv: list[str]) -> int:
    """``ctxaware nih``: run the grid for every ``--model``, then write summaries, heatmaps and a bar chart."""
    cfg = parse_config(NIHConfig, argv, prog="ctxaware nih")
    check(cfg)  # bad input fails before a model loads
    names = list(dict.fromkeys(m.strip() for m in cfg.model.split(",") if m.strip()))
    if len({run_id(n) for n in names}) < len(names):
        raise CtxawareError(f"--model lists the same model twice: {cfg.model}")
    if cfg.dump_prompts:
        return _dump(cfg, names)
    for name in names:
        preflight(cfg, name)
    out = Path(cfg.output)
    summaries = {}
    for name in names:
        short, rows = run_model(cfg, name)
        if dist_info()[0] == 0:  # under a launcher, rank 0 holds the merged rows and writes the summaries
            summaries[short] = report(out, short, rows)
    if dist_info()[0] != 0:
        return 0
    try:  # keep the models of earlier invocations in the top-level summary
        before = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        before = {}
    summaries = {**(before if isinstance(before, dict) else {}), **summaries}
    write_json_atomic(out / "summary.json", summaries)
    md = table(summaries)
    if cfg.steer is not None:
        md += "\n\nAttention steering (paper Table 1; NIH recall):\n\n" + steering_table(summaries)
    write_text_atomic(out / "summary.md", md + "\n")
    bars = {
        c: {
            m: (s["recall_error"]["mean"], s["recall_error"]["ci_low"], s["recall_error"]["ci_high"])
            for m, conds in summaries.items()
            for cc, s in conds.items()
            if cc == c
        }
        for c in dict.fromkeys(c for conds in summaries.values() for c in conds)
    }
    plotting.bar_chart(
        bars,
        out / "conditions.png",
        "NIH recall error by condition (paper Fig. 2)",
        "recall error (1 - recall)",
    )
    print(md)
    print(
        f"results in {out}/ (rows.jsonl, summary.json and heatmap.png per model and condition, conditions.png)"
    )
    return 0
