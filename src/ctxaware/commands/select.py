"""``ctxaware select``: the command line of `ctxaware.scoring.selection` (parse, run, print)."""

from __future__ import annotations

import sys
from pathlib import Path

from ctxaware.core.config import parse_config
from ctxaware.scoring.selection import SelectConfig, format_table, run


def main(argv: list[str]) -> int:
    """``ctxaware select SCORES DATA --beta 0.6 --output OUT``."""
    cfg = parse_config(SelectConfig, argv, prog="ctxaware select")
    s = run(cfg)
    bad = s["malformed_score_lines"]
    if bad["total"]:
        why = ", ".join(f"{n} {r}" for r, n in bad["by_reason"].items())
        print(f"ctxaware select: skipped {bad['total']} malformed score lines ({why}); see selection.json",
              file=sys.stderr)  # fmt: skip
    print(format_table({Path(cfg.data).name: s["table3"]}))
    print(
        f"selected {s['n_selected']}/{s['n_scored']} scored turns (beta={cfg.beta}, {s['n_unscored']} unscored) "
        f"-> {cfg.output}"
    )
    return 0
