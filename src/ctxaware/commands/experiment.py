"""``ctxaware experiment``: the command line of `ctxaware.experiment` (parse, run, print)."""

from __future__ import annotations

from pathlib import Path

from ctxaware.core.config import parse_sectioned
from ctxaware.experiment import RENAMED, ExperimentConfig, print_help, run


def main(argv: list[str]) -> int:
    """``ctxaware experiment CONFIG.yaml [--option value ...]``."""
    argv = list(argv)
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml")):
        argv = ["--config", *argv]
    if any(a in ("-h", "--help") for a in argv):
        return print_help()
    cfg = parse_sectioned(ExperimentConfig, argv, "ctxaware experiment", RENAMED)
    from ctxaware.core.results import exclusive

    with exclusive(cfg.output_dir, ".experiment.lock"):  # one experiment per output directory
        print(run(cfg))
    print(f"\nwritten: {Path(cfg.output_dir) / 'comparison.md'}")
    return 0
