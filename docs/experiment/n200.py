"""n = 200 evaluation of the experiment's checkpoints under the authors' QA protocol (docs/experiment.md).

    python docs/experiment/n200.py TASK [TASK ...]      # e.g. cf_world_facts squad drop

Trains what `ctxaware experiment docs/experiment/gemma.yaml` trains for Table 4 (vanilla SFT, eq. (2)
scores with it as the seed, the [IND]-marked +indicator SFT), each stage cached and resumed under
runs/experiment_gemma/ exactly as the experiment does, then evaluates every TASK at n = 200 on the base
(without a template: the paper's base rows; and with the training template beside it), the vanilla SFT
and the +indicator SFT, through the experiment's own evaluation stage (same template, seed, 100 new
tokens; DROP 256 as the authors' task). Task by task, so a finished task is kept when the session ends.
Output: runs/experiment_gemma_n200_TASK/ (rows resume after a kill) and its n200.json (paired CIs).
"""

import sys
from pathlib import Path

from ctxaware.core.config import parse_sectioned
from ctxaware.core.results import write_json_atomic
from ctxaware.experiment import (
    RENAMED,
    ExperimentConfig,
    paired,
    step_data,
    step_evaluate,
    step_score,
    step_seed,
    step_select,
    step_table3,
    step_train,
)

TASKS = sys.argv[1:] or ["cf_world_facts"]
src = Path("runs/experiment_gemma")

cfg = parse_sectioned(ExperimentConfig, ["--config", "docs/experiment/gemma.yaml"], "n200", RENAMED)
cfg.data = step_data(cfg, src)
seed_model, _ = step_seed(cfg, src)
scores = step_score(cfg, src, seed_model)
print("table 3:", step_table3(cfg, src, scores))
beta = cfg.betas[0]
marked = step_select(cfg, src, scores, beta)
vanilla = str(src / "train/vanilla/model")
indicator = step_train(cfg, src, f"ind_indicator_b{beta}", str(marked), True)["model_dir"]

for task in TASKS:
    root = Path("runs/experiment_gemma_n200_" + task)
    root.mkdir(parents=True, exist_ok=True)
    tcfg = parse_sectioned(
        ExperimentConfig,
        ["--config", "docs/experiment/gemma.yaml", "--eval.limit", "200", "--eval.tasks", task,
         "--mt_bench_limit", "0", "--output_dir", str(root)],
        "n200", RENAMED,
    )  # fmt: skip
    runs = {  # name: (model dir, indicator at inference, mode)
        "base/plain": ("gemma3-270m", False, "plain"),
        "base": ("gemma3-270m", False, "chat"),
        "vanilla": (vanilla, False, "chat"),
        f"ind_indicator_b{beta}": (indicator, True, "chat"),
    }
    out = {}
    for name, (model_dir, ind, mode) in runs.items():
        out[name] = step_evaluate(tcfg, root, name.split("/")[0], model_dir, ind, mode)[task]
    pairs = {}
    metrics = ("p_s", "p_o") if task.startswith("cf") else ("contains",)
    for a, b in (("base/plain", "vanilla"), ("base", "vanilla"), ("vanilla", f"ind_indicator_b{beta}")):
        for m in metrics:
            pairs[f"{b} - {a} {m}"] = paired(root, a, b, task, m)
    write_json_atomic(root / "n200.json", {"results": out, "paired": pairs})
    print(f"== {task}")
    for k, v in pairs.items():
        print(k, {x: round(100 * v[x], 1) for x in ("mean", "ci_low", "ci_high")}, v["n"])
    for k, v in out.items():
        print(k, {m: round(100 * s["mean"], 1) for m, s in v["metrics"].items()} if "metrics" in v else v)
