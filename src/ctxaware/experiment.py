"""The paper's experiment end to end (Sec. 4, Table 4, Table 9): ``ctxaware experiment CONFIG.yaml``.

score (seed model, eq. 2) -> select (beta, [IND]-marked data) -> train vanilla and +indicator (same seed,
same conversations in the same order) -> evaluate both (QA and conflict sets, NIH; the +indicator model
with the indicator on every query) -> a Table-4-style comparison (``comparison.md``/``.json``) and the
context-reliance curves of both runs. One ``+indicator`` run per beta in ``betas`` gives the Table-9
ablation. Every stage caches its output under ``output_dir`` and a rerun skips what is finished.

Layout: ``scores.jsonl``, ``data/marked_b{beta}.json``, ``train/{run}/``, ``eval/{run}/``, ``nih/``,
``comparison.md``, ``context_reliance.png``. The stages call the other modules' functions; this module only
wires them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from ctxaware.config import parse_config
from ctxaware.conversations import load_conversations, write_conversations
from ctxaware.errors import CtxawareError
from ctxaware.results import write_json_atomic
from ctxaware.train import TrainConfig, train

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ExperimentConfig(TrainConfig):
    """Every `TrainConfig` option (applied to both runs; ``output_dir`` is the experiment's root) plus:

    Parameters:
        score_model: seed model that scores the data (paper: a vanilla fine-tune; default SmolLM2-135M-Instruct).
        score_layer: scoring layer (default: the seed model's middle layer).
        betas: thresholds; one +indicator run per beta (the first is the headline, more give Table 9).
        eval_tasks: `ctxaware.tasks` names evaluated for every run; eval_limit examples each (seeded).
        nih_lengths / nih_depths: the NIH grid (empty lengths: no NIH).
    """

    score_model: str = dataclasses.field(
        default="default", metadata={"help": "seed model for eq. (2) scores"}
    )
    score_layer: int | None = dataclasses.field(
        default=None, metadata={"help": "scoring layer (default: middle)"}
    )
    betas: list[float] = dataclasses.field(
        default_factory=lambda: [0.6], metadata={"help": "selection thresholds"}
    )
    eval_tasks: list[str] = dataclasses.field(
        default_factory=lambda: ["squad", "quac", "drop", "cf_world_facts", "nqswap"],
        metadata={"help": "evaluation tasks (ctxaware.tasks names)"},
    )
    eval_limit: int | None = dataclasses.field(
        default=100, metadata={"help": "examples per task (seeded sample)"}
    )
    eval_max_new_tokens: int = dataclasses.field(default=64, metadata={"help": "new tokens per answer"})
    nih_lengths: list[int] = dataclasses.field(default_factory=list, metadata={"help": "NIH context lengths"})
    nih_depths: list[float] = dataclasses.field(
        default_factory=lambda: [0.0, 50.0, 100.0], metadata={"help": "NIH needle depths (%)"}
    )


def _train_config(cfg: ExperimentConfig, **changes) -> TrainConfig:
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{**values, **changes})


def stage_score(cfg: ExperimentConfig, root: Path) -> Path:
    """Eq. (2) scores of every assistant turn (resumable in `ctxaware.score`; skipped when done)."""
    from ctxaware.score import ScoreConfig, run

    out = root / "scores.jsonl"
    if out.with_suffix(".summary.json").is_file():
        return out
    run(ScoreConfig(data=str(cfg.data), model=cfg.score_model, output=str(out), layer=cfg.score_layer,
                    format=cfg.data_format, limit=cfg.max_conversations, max_tokens=cfg.max_length,
                    device=cfg.device, progress=False))  # fmt: skip
    return out


def stage_select(cfg: ExperimentConfig, root: Path, scores_path: Path, beta: float) -> Path:
    """The [IND]-marked copy of the training data for ``beta`` (same conversations, same order)."""
    out = root / "data" / f"marked_b{beta}.json"
    meta = out.with_suffix(".selection.json")
    inputs = {"data": cfg.data, "limit": cfg.max_conversations, "token": cfg.indicator_token, "beta": beta}
    if out.is_file() and meta.is_file() and json.loads(meta.read_text()).get("inputs") == inputs:
        return out  # cached: the same data, rows, token and threshold
    from ctxaware.selection import load_scores, select

    convs, _ = load_conversations(
        cfg.data, cfg.data_format, split=cfg.data_split, limit=cfg.max_conversations
    )  # type: ignore[arg-type]
    marked, counts = select(convs, load_scores(scores_path), beta, cfg.indicator_token)
    write_conversations(marked, out)
    ratio = counts["n_selected"] / max(1, counts["n_scored"])
    write_json_atomic(meta, {"beta": beta, **counts, "ratio": ratio, "inputs": inputs})
    return out


def stage_train(cfg: ExperimentConfig, root: Path, name: str, data: str, indicator: bool) -> dict:
    """Train one run (skipped when its summary exists; resumed from its last checkpoint otherwise)."""
    return train(_train_config(cfg, data=data, indicator=indicator, output_dir=str(root / "train" / name)))


def stage_evaluate(cfg: ExperimentConfig, root: Path, name: str, model_dir: str, indicator: bool) -> dict:
    """QA/conflict tasks and NIH for one trained model; cached in ``eval/{name}/results.json``."""
    done = root / "eval" / name / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    from ctxaware.evaluate import EvalConfig, evaluate_tasks
    from ctxaware.models import load_model

    model, tok = load_model(model_dir, device=cfg.device, dtype=cfg.dtype)
    ecfg = EvalConfig(model=model_dir, modes=["chat"], indicator=indicator, limit=cfg.eval_limit, seed=cfg.seed,
                      max_new_tokens=cfg.eval_max_new_tokens, output=str(root / "eval" / name))  # fmt: skip
    results = evaluate_tasks(
        model, tok, cfg.eval_tasks, ecfg, model_name=name, output_dir=root / "eval" / name
    )
    del model
    if cfg.nih_lengths:
        results["nih"] = stage_nih(cfg, root, name, model_dir, indicator)
    write_json_atomic(done, results)
    return results


def stage_nih(cfg: ExperimentConfig, root: Path, name: str, model_dir: str, indicator: bool) -> dict:
    from ctxaware import nih

    ncfg = nih.NIHConfig(model=model_dir, device=cfg.device, dtype=cfg.dtype, lengths=cfg.nih_lengths,
                         depths=cfg.nih_depths, modes=["chat"], indicator=[indicator], prefix=[False],
                         output=str(root / "nih" / name))  # fmt: skip
    short, rows = nih.run_model(ncfg, model_dir)
    summary = next(iter(nih.report(Path(ncfg.output), short, rows).values()))
    return {"kind": "nih", "n": len(rows), "metrics": {"recall": summary["recall"]}}


def compare(root: Path, runs: dict[str, dict]) -> str:
    """Table-4-style markdown (tasks x runs, 95% CIs) and the context-reliance curves of every run."""
    from ctxaware.evaluate import summary_markdown
    from ctxaware.plotting import context_reliance_steps
    from ctxaware.stats import fmt

    table = summary_markdown(
        {name: {"chat": {k: v for k, v in r["eval"].items() if k != "nih"}} for name, r in runs.items()}
    )
    nih_rows = [
        f"| {name} | {fmt(r['eval']['nih']['metrics']['recall'])} |"
        for name, r in runs.items()
        if "nih" in r["eval"]
    ]
    if nih_rows:
        table += "\n\n| run | NIH recall |\n|---|---|\n" + "\n".join(nih_rows)
    curves = {
        name: r["train"]["context_reliance"] for name, r in runs.items() if r["train"].get("context_reliance")
    }
    if curves:
        context_reliance_steps(curves, root / "context_reliance.png")
    (root / "comparison.md").write_text(table + "\n")
    write_json_atomic(root / "comparison.json", runs)
    return table


def run(cfg: ExperimentConfig) -> str:
    if not cfg.data:
        raise CtxawareError("no data; set data: PATH (the instruction dataset to score, select and train on)")
    if not cfg.betas:
        raise CtxawareError("betas is empty; give at least one threshold, e.g. betas: [0.6]")
    root = Path(cfg.output_dir)
    scores = stage_score(cfg, root)
    plan = {"vanilla": (str(cfg.data), False)}
    for beta in cfg.betas:
        plan[f"+indicator b={beta}"] = (str(stage_select(cfg, root, scores, beta)), True)
    runs = {}
    for name, (data, indicator) in plan.items():
        slug = name.replace("+", "ind_").replace(" b=", "_b").replace(" ", "_")
        summary = stage_train(cfg, root, slug, data, indicator)
        runs[name] = {
            "train": summary,
            "eval": stage_evaluate(cfg, root, slug, summary["model_dir"], indicator),
        }
        if indicator:
            runs[name]["selection"] = json.loads(Path(data).with_suffix(".selection.json").read_text())
    return compare(root, runs)


def main(argv: list[str]) -> int:
    """``ctxaware experiment CONFIG.yaml [--option value ...]``."""
    argv = list(argv)
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml")):
        argv = ["--config", *argv]
    cfg = parse_config(ExperimentConfig, argv, prog="ctxaware experiment")
    print(run(cfg))
    print(f"\nwritten: {Path(cfg.output_dir) / 'comparison.md'}")
    return 0
