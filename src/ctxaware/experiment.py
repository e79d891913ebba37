"""The paper's experiment end to end (Sec. 4, Table 4, Table 9): ``ctxaware experiment CONFIG.yaml``.

seed (the paper's seed model: a vanilla SFT of the base on the same data with the training template; with
``seed_model: trained``, the default, this is the vanilla run itself) -> score (eq. 2 with the seed) -> select
(beta, [IND]-marked data) -> train +indicator (same seed, same conversations in the same order) -> evaluate
every run (QA and conflict sets, NIH; the +indicator model with the indicator on every query) -> a
Table-4-style comparison (``comparison.md``/``.json``) and the context-reliance curves of every run. One
``+indicator`` run per beta in ``betas`` gives the Table-9 ablation. Every stage caches its output under
``output_dir`` and a rerun skips what is finished (``train/vanilla`` is the seed stage's cache too).

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
from ctxaware.results import fingerprint_inputs, write_json_atomic
from ctxaware.train import TrainConfig, train

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ExperimentConfig(TrainConfig):
    """Every `TrainConfig` option (applied to both runs; ``output_dir`` is the experiment's root) plus:

    Parameters:
        seed_model: the model that scores the data (eq. 2): ``trained`` (default, the paper's choice: the
            vanilla SFT of ``model`` on ``data`` with the training template, trained first as a stage) or a
            model spec (e.g. ``default`` = SmolLM2-135M-Instruct) used as it is.
        score_layer / score_max_tokens: scoring layer and truncation (default: `ctxaware.score`'s defaults).
        betas: thresholds; one +indicator run per beta (the first is the headline, more give Table 9).
        eval_tasks: `ctxaware.tasks` names evaluated for every run; eval_limit examples each (seeded).
        nih_lengths / nih_depths: the NIH grid (empty lengths: no NIH).
    """

    seed_model: str = dataclasses.field(
        default="trained",
        metadata={
            "help": "seed model for eq. (2): trained (vanilla SFT of model on data, the paper's) or a spec"
        },
    )
    score_model: str | None = dataclasses.field(
        default=None, metadata={"help": "deprecated spelling of seed_model (a model spec)"}
    )
    score_layer: int | None = dataclasses.field(
        default=None, metadata={"help": "scoring layer (default: ctxaware score's)"}
    )
    score_max_tokens: int | None = dataclasses.field(
        default=None, metadata={"help": "scoring truncation in tokens (default: ctxaware score's)"}
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
    eval_max_new_tokens: int = dataclasses.field(
        default=100, metadata={"help": "new tokens per answer (paper App. A.3: 100)"}
    )
    nih_lengths: list[int] = dataclasses.field(default_factory=list, metadata={"help": "NIH context lengths"})
    nih_depths: list[float] = dataclasses.field(
        default_factory=lambda: [0.0, 50.0, 100.0], metadata={"help": "NIH needle depths (%)"}
    )


def _train_config(cfg: ExperimentConfig, **changes) -> TrainConfig:
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{**values, **changes})


def seed_spec(cfg: ExperimentConfig) -> str:
    """The seed model's spec as configured: ``trained`` or a model spec (``score_model`` wins if set)."""
    return cfg.score_model or cfg.seed_model


def stage_seed(cfg: ExperimentConfig, root: Path) -> tuple[str, dict | None]:
    """The seed model for eq. (2): ``(model spec or dir, training summary or None)``. With ``seed_model:
    trained`` this trains (or resumes, or reuses) ``train/vanilla``: the paper's seed is a vanilla SFT of the
    base on the same data with the training template, which is exactly the vanilla run."""
    spec = seed_spec(cfg)
    if spec != "trained":
        return spec, None
    summary = stage_train(cfg, root, "vanilla", str(cfg.data), False)
    return summary["model_dir"], summary


def stage_score(cfg: ExperimentConfig, root: Path, seed_model: str | None = None) -> Path:
    """Eq. (2) scores of every assistant turn with the seed model (resumable in `ctxaware.score`; skipped
    when done under the same seed)."""
    from ctxaware.score import ScoreConfig, run

    seed_model = seed_model or seed_spec(cfg)
    out = root / "scores.jsonl"
    meta = root / "scores.seed.json"
    if out.with_suffix(".summary.json").is_file() and meta.is_file():
        if json.loads(meta.read_text()).get("seed_model") == seed_model:
            from ctxaware.selection import check_scored_data

            check_scored_data(out, str(cfg.data))  # data replaced at the same path: refused (docs/resume.md)
            return out
    optional = {"layer": cfg.score_layer, "max_tokens": cfg.score_max_tokens}
    run(ScoreConfig(data=str(cfg.data), model=seed_model, output=str(out), format=cfg.data_format,
                    limit=cfg.max_conversations, device=cfg.device, progress=False,
                    **{k: v for k, v in optional.items() if v is not None}))  # fmt: skip
    write_json_atomic(meta, {"seed_model": seed_model})
    return out


def stage_select(cfg: ExperimentConfig, root: Path, scores_path: Path, beta: float) -> Path:
    """The [IND]-marked copy of the training data for ``beta`` (same conversations, same order)."""
    out = root / "data" / f"marked_b{beta}.json"
    meta = out.with_suffix(".selection.json")
    inputs = {"data": cfg.data, "limit": cfg.max_conversations, "token": cfg.indicator_token, "beta": beta,
              "contents": fingerprint_inputs({"data": str(cfg.data)})["data"]}  # fmt: skip
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
                      data_dir=None, device=cfg.device, dtype=cfg.dtype,
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
    if cfg.eval_limit is not None and cfg.eval_limit < 1:
        raise CtxawareError(
            f"eval_limit {cfg.eval_limit}: give a positive number of examples, or null for all"
        )
    from ctxaware.train import validate

    validate(cfg)
    root = Path(cfg.output_dir)
    seed_model, seed_summary = stage_seed(cfg, root)
    scores = stage_score(cfg, root, seed_model)
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
    if any(a in ("-h", "--help") for a in argv):
        from ctxaware.finetune import print_help

        return print_help(ExperimentConfig, "ctxaware experiment")
    cfg = parse_config(ExperimentConfig, argv, prog="ctxaware experiment")
    print(run(cfg))
    print(f"\nwritten: {Path(cfg.output_dir) / 'comparison.md'}")
    return 0
