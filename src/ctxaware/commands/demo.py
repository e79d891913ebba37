"""``ctxaware demo``: the command line of `ctxaware.demo` (parse, run, print)."""

from __future__ import annotations

import time
from pathlib import Path

from ctxaware.core.config import parse_config
from ctxaware.core.provenance import provenance
from ctxaware.core.results import write_json_atomic
from ctxaware.demo import DemoConfig, _section, show_attention, show_generation, show_nih, show_rendering
from ctxaware.reporting.report import write_report


def main(argv: list[str]) -> int:
    from ctxaware.core.models import model_shape

    cfg = parse_config(DemoConfig, argv, prog="ctxaware demo")
    t0 = time.time()
    print(f"ctxaware demo: loading {cfg.model} ...")
    model, tok = cfg.load()
    print(
        f"loaded {model.name_or_path} ({model_shape(model)[0]} layers, "
        f"{model_shape(model)[1]} heads) on {model.device} in {time.time() - t0:.1f}s"
    )
    show_rendering(model, tok)
    show_generation(model, tok)
    if not cfg.quick:
        prompts = show_nih(model, tok, cfg)
        show_attention(model, tok, prompts, cfg)
        out = Path(cfg.output)
        write_json_atomic(out / "provenance.json", provenance(t0, model=cfg.model, revision=cfg.revision))
        _section("5. the report of this run")
        path = write_report([out], out / "report.html", title=f"ctxaware demo: {model.name_or_path}")
        print(f"report: {path.resolve()}  (Markdown: {path.with_suffix('.md')})")
    print(f"\ndone in {time.time() - t0:.0f}s")
    return 0
