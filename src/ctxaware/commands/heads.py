"""``ctxaware heads``: the command line of `ctxaware.attention.retrieval_heads` (parse, run, print)."""

from __future__ import annotations

from ctxaware.attention.retrieval_heads import HeadsConfig, all_heads, find_heads, save_heads
from ctxaware.core.config import parse_config


def main(argv: list[str]) -> int:
    """``ctxaware heads``: eq. (3) on NIH prompts, written as PASTA-style JSON."""
    cfg = parse_config(HeadsConfig, argv, prog="ctxaware heads")
    from ctxaware.attention.allocation import nih_prompts

    print(f"ctxaware heads: loading {cfg.model} ...", flush=True)
    model, tok = cfg.load()
    if cfg.all_heads:
        heads = all_heads(model)
    else:
        prompts = nih_prompts(
            tok, cfg.lengths, cfg.depths, chat=cfg.chat, haystack=cfg.haystack, prompts=cfg.prompts
        )
        heads = find_heads(model, prompts, k=cfg.k, include_sink=cfg.include_sink, desc="heads: prompts")
    path = save_heads(heads, cfg.output)
    print(f"wrote {sum(map(len, heads.values()))} heads on {len(heads)} layers to {path}")
    return 0
