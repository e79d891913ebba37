"""``python -m ctxaware.evaluation.lm_eval_tasks``: print the task directory for lm-eval's ``--include_path``."""

from ctxaware.evaluation.lm_eval_tasks import TASK_DIR

print(TASK_DIR)
