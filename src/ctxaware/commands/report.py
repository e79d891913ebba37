"""``ctxaware report``: the command line of `ctxaware.reporting.report` (parse, run, print)."""

from __future__ import annotations

from pathlib import Path

from ctxaware.core.config import parse_config, spare_inputs
from ctxaware.reporting.report import ReportConfig, write_report


def main(argv: list[str]) -> int:
    cfg = parse_config(ReportConfig, argv, prog="ctxaware report")
    out = Path(cfg.output)
    twin = out.with_suffix(".md") if out.suffix == ".html" else out.parent / "report.md"
    spare_inputs([("--output (its Markdown twin)", str(twin), "output_file"),
                  ("--output (its figure folder)", str(out.parent / (out.stem + "_files")), "output_dir")],
                 [("a run directory", r) for r in cfg.runs], cfg.overwrite, True)  # fmt: skip
    path = write_report(cfg.runs, cfg.output, cfg.title)
    print(
        f"report: {path} (Markdown twin: {path.with_suffix('.md')}, figures in {path.parent / (path.stem + '_files')})"
    )
    return 0
