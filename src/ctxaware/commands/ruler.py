"""``ctxaware ruler``: the command line of `ctxaware.evaluation.ruler` (parse, run, print)."""

from __future__ import annotations

from pathlib import Path

from ctxaware.core.config import parse_config
from ctxaware.core.distributed import dist_info
from ctxaware.core.errors import CtxawareError
from ctxaware.core.models import run_id
from ctxaware.core.results import write_json_atomic, write_text_atomic
from ctxaware.evaluation.ruler import (
    RulerConfig,
    compare,
    compare_markdown,
    dump_prompts,
    report,
    run_model,
    summary_markdown,
)


def main(argv: list[str]) -> int:
    """``ctxaware ruler``: RULER-class retrieval, chat vs plain, for every ``--model``."""
    cfg = parse_config(RulerConfig, argv, prog="ctxaware ruler")
    names = list(dict.fromkeys(m.strip() for m in cfg.model.split(",") if m.strip()))
    if len({run_id(n) for n in names}) < len(names):
        raise CtxawareError(f"--model lists the same model twice: {cfg.model}")
    if cfg.dump_prompts:
        return dump_prompts(cfg, names)
    out = Path(cfg.output)
    runs = {}
    for name in names:
        short, rows = run_model(cfg, name)
        if dist_info()[0] == 0:  # under a launcher rank 0 holds the merged rows
            print(summary_markdown(short, report(out, short, rows)))
            runs[short] = rows
    if dist_info()[0] != 0:
        return 0
    print(f"\nresults in {out}/<model>/ (rows.jsonl, summary.json, summary.md)")
    if len(runs) > 1:  # every later model against the first on the same contexts
        cmp = compare(runs)
        md = compare_markdown(cmp)
        write_json_atomic(out / "comparison.json", cmp)
        write_text_atomic(out / "comparison.md", md + "\n")
        print(f"\n{md}\n\ncomparison in {out}/comparison.md (and .json)")
    return 0
