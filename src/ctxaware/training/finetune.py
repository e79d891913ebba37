"""``ctxaware train``: fine-tune one stage of the pipeline, SFT -> DPO -> RLVR, chosen in the YAML.

``stage: sft`` (`ctxaware.training.sft`, paper Sec. 4), ``dpo`` (`ctxaware.training.preference`, TRL's DPOTrainer) or ``grpo``
(`ctxaware.training.rlvr`, TRL's GRPOTrainer with a verifiable reward). Each stage starts from ``model``, normally
the previous stage's output directory. This module sits above the three so that imports run one way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ctxaware.core.config import build_parser, load_yaml
from ctxaware.core.errors import CtxawareError
from ctxaware.training.preference import DPOStageConfig, train_dpo
from ctxaware.training.rlvr import GRPOStageConfig, train_grpo
from ctxaware.training.sft import TrainConfig, train

STAGES = {
    "sft": (TrainConfig, train),
    "dpo": (DPOStageConfig, train_dpo),
    "grpo": (GRPOStageConfig, train_grpo),
}


def _stage_of(argv: Sequence[str]) -> str:
    argv = list(argv)
    for i, a in enumerate(argv):
        if a == "--stage" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--stage="):
            return a.split("=", 1)[1]
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        return load_yaml(argv[argv.index("--config") + 1]).get("stage") or "sft"
    return "sft"


def stage_config(argv: Sequence[str]) -> type:
    """The config class for ``ctxaware train ARGV``: the ``stage`` of ``--stage`` or of the YAML decides."""
    stage = _stage_of(argv)
    if stage not in STAGES:
        raise CtxawareError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    return STAGES[stage][0]


def run_stage(cfg: TrainConfig, model=None, tokenizer=None, callbacks: Sequence = ()) -> dict:
    """Train ``cfg.stage``; a plain `TrainConfig` naming another stage is converted to that stage's class."""
    if cfg.stage not in STAGES:
        raise CtxawareError(f"stage {cfg.stage!r} is not one of {', '.join(STAGES)}")
    cls, fn = STAGES[cfg.stage]
    if not isinstance(cfg, cls):
        cfg = cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init})
    return fn(cfg, model, tokenizer, callbacks)


def print_help(cls: type, prog: str, description: str | None = None) -> int:
    """``--help`` with the positional ``CONFIG.yaml`` that the README uses (same as ``--config``)."""
    parser = build_parser(cls, prog, description)
    parser.add_argument("CONFIG.yaml", nargs="?", help="YAML file with the options (same as --config)")
    parser.print_help()
    return 0
