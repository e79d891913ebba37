"""``ctxaware train``: the command line of `ctxaware.training.finetune` (parse, run, print)."""

from __future__ import annotations

from ctxaware.core.config import parse_config
from ctxaware.training.finetune import print_help, run_stage, stage_config
from ctxaware.training.sft import TrainConfig


def main(argv: list[str]) -> int:
    """``ctxaware train CONFIG.yaml [--option value ...]``."""
    argv = list(argv)
    if argv and not argv[0].startswith("-"):  # a recipe name or a YAML path, given positionally
        from ctxaware.training.recipes import resolve

        argv = ["--config", resolve(argv[0]), *argv[1:]]
    if any(a in ("-h", "--help") for a in argv):
        return print_help(TrainConfig, "ctxaware train")
    cfg = parse_config(stage_config(argv), argv, prog="ctxaware train")
    from ctxaware.core.results import exclusive

    with exclusive(cfg.output_dir, ".train.lock"):  # a second train into the same output_dir is refused
        summary = run_stage(cfg)
    d = summary["data"]
    print(
        f"trained {summary['global_step']} steps on {d['n_examples']} examples ({d['n_trainable_tokens']} loss tokens) "
        f"in {summary['wall_seconds']} s; loss {summary['train_loss']:.3f}; model: {summary['model_dir']}"
    )
    if summary["context_reliance"]:
        curve = ", ".join(f"{r['step']}: {r['p_s']:.2f}/{r['p_o']:.2f}" for r in summary["context_reliance"])
        print(f"p_s/p_o by step: {curve}")
    return 0
