"""n = 200 follow-up of `ctxaware experiment docs/experiment/gemma.yaml` (docs/experiment.md).

    python docs/experiment/n200.py TASK      # e.g. cf_world_facts, squad

Evaluates one task at n = 200 on the experiment's trained checkpoints (base, vanilla SFT, +indicator SFT)
through the experiment's own evaluation stage (same template, seed, 100 new tokens), then prints the
paired differences. Output: runs/experiment_gemma_n200_TASK/ (rows resume after a kill).
"""

import sys
from pathlib import Path

from ctxaware.config import parse_config
from ctxaware.experiment import ExperimentConfig, paired, stage_evaluate
from ctxaware.results import write_json_atomic

TASK = sys.argv[1] if len(sys.argv) > 1 else "cf_world_facts"

src = Path("runs/experiment_gemma")
root = Path("runs/experiment_gemma_n200_" + TASK)
root.mkdir(parents=True, exist_ok=True)
(root / "template.jinja").write_text((src / "template.jinja").read_text())
cfg = parse_config(
    ExperimentConfig,
    [
        "--config",
        "docs/experiment/gemma.yaml",
        "--eval_limit",
        "200",
        "--eval_tasks",
        TASK,
        "--mt_bench_limit",
        "0",
        "--output_dir",
        str(root),
    ],
    prog="n200",
)
runs = {
    "base": ("gemma3-270m", False),
    "vanilla": (str(src / "train/vanilla/model"), False),
    "ind_indicator_b0.6": (str(src / "train/ind_indicator_b0.6/model"), True),
}
out = {}
for name, (model_dir, ind) in runs.items():
    out[name] = stage_evaluate(cfg, root, name, model_dir, ind)[TASK]
pairs = {}
for a, b in (("base", "vanilla"), ("vanilla", "ind_indicator_b0.6")):
    for m in ("p_s", "p_o") if TASK.startswith("cf") else ("contains",):
        pairs[f"{b} - {a} {m}"] = paired(root, a, b, TASK, m)
write_json_atomic(root / "n200.json", {"results": out, "paired": pairs})
for k, v in pairs.items():
    print(k, {x: round(100 * v[x], 1) for x in ("mean", "ci_low", "ci_high")}, v["n"])
for k, v in out.items():
    print(k, {m: round(100 * s["mean"], 1) for m, s in v["metrics"].items()} if "metrics" in v else v)
