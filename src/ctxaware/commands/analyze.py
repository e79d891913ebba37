"""``ctxaware analyze``: the command line of `ctxaware.scoring.analyze` (parse, run, print)."""

from __future__ import annotations

import numpy as np

from ctxaware.core.config import parse_config
from ctxaware.scoring.analyze import AnalyzeConfig, _off, run


def main(argv: list[str]) -> int:
    """``ctxaware analyze SCORES [--data DATA] --output DIR``."""
    cfg = parse_config(AnalyzeConfig, argv, prog="ctxaware analyze")
    res = run(cfg)
    if "layer_agreement" in res:
        la = res["layer_agreement"]
        mat = np.asarray(la["disagreement"])
        layers, c = la["layers"], len(la["layers"]) // 2
        mid = list(range(max(0, c - 4), min(len(layers), c + 5)))  # up to 9 scored layers around the middle
        sub = mat[np.ix_(mid, mid)]
        print(f"layer disagreement (off-diagonal mean): all {len(layers)} scored layers {_off(mat):.3f}, the middle "
              f"{len(mid)} of them (layers {', '.join(str(layers[i]) for i in mid)}) {_off(sub):.3f}")  # fmt: skip
    if "instruction_lengths" in res:
        il = res["instruction_lengths"]
        print(f"instruction length: original {il['original']}, selected ({il['selection']}) {il['selected']}")
    print(f"-> {cfg.output}")
    return 0
