"""ctxaware's evaluations as an lm-evaluation-harness task pack (docs/lm_eval.md).

``lm_eval --model hf --model_args pretrained=M --include_path $(ctxaware lm-eval-tasks) --tasks ctxaware_squad``
runs ctxaware's SQuAD under the authors' protocol with any lm-eval backend; `TASK_DIR` is that path, and
`task_names()` the tasks and groups it holds. The prompts and scores are ctxaware's (`hooks`).
"""

from __future__ import annotations

from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent


def task_names() -> list[str]:
    """Every task and group in the pack (the YAML files' names)."""
    return sorted(p.stem for p in TASK_DIR.glob("ctxaware_*.yaml"))


__all__ = ["TASK_DIR", "task_names"]
