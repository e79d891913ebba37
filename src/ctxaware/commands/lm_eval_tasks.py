"""``ctxaware lm-eval-tasks``: where ctxaware's lm-evaluation-harness task pack lives (`ctxaware.evaluation.lm_eval_tasks`)."""

from __future__ import annotations

from ctxaware.core.errors import CtxawareError
from ctxaware.evaluation.lm_eval_tasks import TASK_DIR, task_names


def main(argv: list[str]) -> int:
    """Print the task directory (for ``lm_eval --include_path``); ``--list`` prints the task names too."""
    if argv and argv[0] in ("-h", "--help"):
        print(
            "usage: ctxaware lm-eval-tasks [--list]\n\nprint the directory to give lm_eval --include_path; "
            "--list: the tasks and groups in it (docs/lm_eval.md)"
        )
        return 0
    if argv not in ([], ["--list"]):
        raise CtxawareError(f"ctxaware lm-eval-tasks takes only --list, got {' '.join(argv)}")
    print(TASK_DIR)
    if argv:
        print("\n".join(task_names()))
    return 0
