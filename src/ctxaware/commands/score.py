"""``ctxaware score``: the command line of `ctxaware.scoring.score` (parse, run, print)."""

from __future__ import annotations

from ctxaware.core.config import parse_config
from ctxaware.core.errors import CtxawareError
from ctxaware.scoring.score import ScoreConfig, run


def main(argv: list[str]) -> int:
    """``ctxaware score DATA --model M --layer L --output scores.jsonl``."""
    cfg = parse_config(ScoreConfig, argv, prog="ctxaware score")
    if not cfg.data:
        raise CtxawareError("give a dataset: ctxaware score DATA --output scores.jsonl")
    summary = run(cfg)
    if summary is not None:
        sk = summary["skipped_turns"]["total"] + summary["skipped_rows"]["total"]
        tp = summary["throughput"]
        print(f"scored {summary['n_scored']}/{summary['n_turns']} turns of {summary['n_conversations']} conversations "
              f"({summary['n_truncated']} truncated, {sk} skipped) -> {cfg.output}")  # fmt: skip
        print(f"throughput: {tp['tokens_per_s']:.1f} tokens/s ({tp['tokens']} tokens in {tp['seconds']:.2f} s of "
              f"scoring, {tp['ranks']}; {tp['wall_seconds_with_load']:.2f} s with loading)")  # fmt: skip
    return 0
