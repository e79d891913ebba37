"""``ctxaware stages``: the command line of `ctxaware.evaluation.stages` (parse, run, print)."""

from __future__ import annotations

from pathlib import Path

from ctxaware.core.config import parse_config
from ctxaware.evaluation.stages import StagesConfig, run, summary_markdown


def main(argv: list[str]) -> int:
    """``ctxaware stages base=SPEC,sft=SPEC,... [--tasks ...] [--n N]``."""
    cfg = parse_config(StagesConfig, argv, prog="ctxaware stages")
    s = run(cfg)
    if "rank" in s:  # under torchrun / accelerate launch, a rank other than 0: rank 0 reports
        return 0
    print(summary_markdown(s))
    print(f"wrote {Path(cfg.output) / 'summary.json'}, summary.md, rows.jsonl and plots")
    return 0
