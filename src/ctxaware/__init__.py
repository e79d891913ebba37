"""ctxaware: measure and protect the context awareness of language models.

The package reads as the method of Wang et al., "On the Loss of Context-awareness in General
Instruction Fine-tuning", one subpackage per step (docs/architecture.md):

    core        -> errors, configs, the model loader, the results writer, statistics, plots
    rendering   -> chat-template rendering with role spans, [IND], the generation engine
    data        -> SFT conversations, NIH prompts, evaluation tasks and metrics
    attention   -> attention per role (Fig. 3-4), retrieval heads (eq. 3), steering (eq. 1)
    scoring     -> context-dependency score (eq. 2), [IND] selection (Table 3)
    training    -> SFT with the indicator, inversion tracking, DPO, RLVR
    evaluation  -> NIH, QA / conflict / MT-Bench, the stage analysis
    reporting   -> one HTML report over any run directories

The main entry points are importable from here for notebooks (``ctxaware.load_model``, ``ctxaware.render``,
...); they are loaded on first use, so ``import ctxaware`` is cheap and changes no global state.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from ctxaware.core.errors import CtxawareError  # noqa: E402

# name -> (module, attribute): the notebook API, each a plain function or class of its step
API = {
    "load_model": ("ctxaware.core.models", "load_model"),
    "load_tokenizer": ("ctxaware.core.models", "load_tokenizer"),
    "render": ("ctxaware.rendering.chat", "render"),
    "user_prompt": ("ctxaware.rendering.chat", "user_prompt"),
    "generate": ("ctxaware.rendering.generate", "generate"),
    "role_allocation": ("ctxaware.attention.allocation", "role_allocation"),
    "role_shares": ("ctxaware.attention.allocation", "role_shares"),
    "normalizations": ("ctxaware.attention.allocation", "normalizations"),
    "steer": ("ctxaware.attention.steering", "steer"),
    "context_dependency_score": ("ctxaware.scoring.score", "context_dependency_score"),
    # one function per runner: each returns its rows (or summary) in memory and writes them as the CLI does
    "NIHConfig": ("ctxaware.evaluation.nih", "NIHConfig"),
    "run_nih": ("ctxaware.evaluation.nih", "run_model"),
    "EvalConfig": ("ctxaware.evaluation.qa", "EvalConfig"),
    "evaluate_tasks": ("ctxaware.evaluation.qa", "evaluate_tasks"),
    "AttentionConfig": ("ctxaware.attention.allocation", "AttentionConfig"),
    "analyze_attention": ("ctxaware.attention.allocation", "analyze"),
    "ScoreConfig": ("ctxaware.scoring.score", "ScoreConfig"),
    "run_score": ("ctxaware.scoring.score", "run"),
    "TrainConfig": ("ctxaware.training.sft", "TrainConfig"),
    "train": ("ctxaware.training.sft", "train"),
}

__all__ = ["CtxawareError", "__version__", *API]


def __getattr__(name: str) -> Any:
    if name in API:
        module, attr = API[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # loaded once
        return value
    raise AttributeError(f"module 'ctxaware' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
