"""``ctxaware attention``: the command line of `ctxaware.attention.allocation` (parse, run, print)."""

from __future__ import annotations

from pathlib import Path

from ctxaware.attention.allocation import (
    AttentionConfig,
    _model_dir_name,
    check_layer,
    conditions_of,
    dump_prompts,
    needle_config,
    prompt_cells,
    run_one,
)
from ctxaware.core.config import parse_config
from ctxaware.core.errors import CtxawareError
from ctxaware.data import needle


def main(argv: list[str]) -> int:
    """``ctxaware attention``: ``allocation.json``, per-prompt rows and figures per model."""
    import time

    cfg = parse_config(AttentionConfig, argv, prog="ctxaware attention")
    check_layer(cfg.layer)
    out = Path(cfg.output)
    specs = [m.strip() for m in cfg.model.split(",") if m.strip()]
    if not specs:
        raise CtxawareError("--model is empty; give a model name")
    names = [_model_dir_name(s) for s in specs]

    cells = []  # every model's prompts from its tokenizer: a bad template or layer fails before any load
    for spec, name in zip(specs, names):
        tok = cfg.load_tokenizer(spec)
        check_layer(cfg.layer, needle.model_config(tok).get("num_hidden_layers"))
        needle.apply_chat_template_choice(tok, cfg.chat_template)
        ncfg = needle_config(cfg.lengths, cfg.depths, conditions_of(tok, name), cfg.haystack, cfg.protocol,
                             cfg.prompts)  # fmt: skip
        ps = prompt_cells(tok, ncfg, cfg.prompts)
        for mode in dict.fromkeys(p.cell["mode"] for p in ps):
            next(p for p in ps if p.cell["mode"] == mode).render(tok)
        cells += [(tok, name, p) for p in ps]
    if cfg.dump_prompts:
        n = dump_prompts(cells, cfg.dump_prompts)
        print(f"wrote {n} prompts to {cfg.dump_prompts}")
        return 0
    for spec, name in zip(specs, names):
        t0 = time.time()
        where = out if len(specs) == 1 else out / name
        allocation = run_one(cfg, spec, where, name)
        if not allocation:  # under torchrun / accelerate launch, a rank other than 0: rank 0 reports
            continue
        for c, v in allocation["conditions"].items():
            se, pa = v["sink_excluded"], v["paper"]
            print(
                f"{name} {c}: layer {allocation['layer']} head {v['head']} n={allocation['n_prompts']}  "
                f"paper user {pa['user']:.3f} sink {pa['sink']:.3f}  sink_excluded user {se['user']:.3f}  "
                f"({time.time() - t0:.0f} s)"
            )
        print(f"wrote {where / 'allocation.json'}, {where / 'rows.jsonl'} and figures")
    return 0
