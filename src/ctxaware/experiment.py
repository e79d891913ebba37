"""The paper's experiment end to end (Sec. 4, Table 3, Table 4, Table 9) plus SFT -> DPO -> RLVR:
``ctxaware experiment CONFIG.yaml``.

data (``data_files``: every set cleaned as the paper cleans ShareGPT, combined and shuffled once) -> seed
(the paper's seed model: a vanilla SFT of the base on the same data with the training template; with
``seed_model: trained``, the default, this is the vanilla run itself, tracked for context-parametric
inversion) -> score (eq. 2 with the seed) -> Table 3 (selected ratio at beta 0.5-0.8) -> select (beta,
[IND]-marked data) -> train +indicator (same base, same conversations in the same order) -> DPO then GRPO
from the vanilla run (``post_stages``) -> evaluate every checkpoint, the base included (QA and conflict
sets, NIH chat vs plain with and without the prefix, attention per role in three normalisations, MT-Bench
with an offline judge; the +indicator model with the indicator on every query) -> the stage analysis over
base -> SFT -> DPO -> GRPO -> ``comparison.md``/``.json`` and plots.

Every stage caches its output under ``output_dir``; a rerun (after a kill at any point) skips what is
finished and resumes training from its last checkpoint. Layout: ``data/``, ``scores.jsonl``,
``table3.json``, ``train/{run}/``, ``eval/{run}/``, ``nih/{run}/``, ``attention/{run}/``, ``stages/``,
``comparison.md``, ``context_reliance.png``, ``timing.json``. This module only wires the other modules.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from pathlib import Path

from ctxaware.core.config import parse_config, to_dict
from ctxaware.core.errors import CtxawareError
from ctxaware.core.results import fingerprint_inputs, read_jsonl, write_json_atomic, write_text_atomic
from ctxaware.data.conversations import load_conversations, write_conversations
from ctxaware.training.sft import ZEPHYR_TEMPLATE, TrainConfig, train

logger = logging.getLogger(__name__)
POST_STAGES = ("dpo", "grpo")


@dataclasses.dataclass
class ExperimentConfig(TrainConfig):
    """Every `TrainConfig` option (applied to every SFT run; ``output_dir`` is the experiment's root) plus:

    Parameters:
        data_files: SFT sets combined into ``data/sft.json`` (cleaned, shuffled with ``seed``, first
            ``max_conversations``); empty: ``data`` is used as it is.
        seed_model: the model that scores the data (eq. 2): ``trained`` (default, the paper's choice: the
            vanilla SFT of ``model`` on ``data`` with the training template, trained first as a stage) or a
            model spec (e.g. ``default`` = SmolLM2-135M-Instruct) used as it is.
        score_layer / score_max_tokens: scoring layer and truncation (default: `ctxaware.scoring.score`'s defaults).
        betas: thresholds; one +indicator run per beta (the first is the headline, more give Table 9).
        table3_betas: thresholds whose selected ratio is reported (paper Table 3).
        post_stages: ``dpo`` and/or ``grpo``, trained in that order from the vanilla SFT model (each from the
            previous one); ``dpo_*`` / ``grpo_*`` set them.
        eval_base: evaluate the base model too: without a template (the paper's base rows), and with the
            training template as extra information (``eval_chat_template``).
        eval_tasks: `ctxaware.data.tasks` names evaluated for every run; eval_limit examples each (seeded).
        nih_lengths / nih_depths: the NIH grid (empty lengths: no NIH); nih_conditions: which of
            ``chat+prefix``, ``plain+prefix``, ``chat``, ``plain``.
        attention_lengths / attention_depths: NIH prompts of the attention analysis (empty: none).
        mt_bench_limit: MT-Bench questions per run, judged by ``judge_local_model`` offline (0: none).
        stages_n / stages_tasks: the stage analysis over base -> vanilla -> post stages (0: none).
    """

    data_files: list[str] = dataclasses.field(
        default_factory=list, metadata={"help": "SFT sets to clean, combine and shuffle (empty: data)"}
    )
    seed_model: str = dataclasses.field(
        default="trained",
        metadata={
            "help": "seed model for eq. (2): trained (vanilla SFT of model on data, the paper's) or a spec"
        },
    )
    score_layer: int | None = dataclasses.field(
        default=None, metadata={"help": "scoring layer (default: ctxaware score's)"}
    )
    score_max_tokens: int | None = dataclasses.field(
        default=None, metadata={"help": "scoring truncation in tokens (default: ctxaware score's)"}
    )
    betas: list[float] = dataclasses.field(
        default_factory=lambda: [0.6], metadata={"help": "selection thresholds", "min": 0, "max": 1}
    )
    table3_betas: list[float] = dataclasses.field(
        default_factory=lambda: [0.5, 0.6, 0.7, 0.8],
        metadata={"help": "Table 3 thresholds", "min": 0, "max": 1},
    )
    post_stages: list[str] = dataclasses.field(
        default_factory=list, metadata={"help": "dpo and/or grpo after the vanilla SFT, in order"}
    )
    dpo_data: str = dataclasses.field(
        default="../shared/data/sft/dpo_en_demo.json", metadata={"help": "preference pairs for DPO"}
    )
    dpo_max_pairs: int | None = dataclasses.field(default=64, metadata={"help": "DPO pairs", "min": 1})
    dpo_max_length: int = dataclasses.field(default=384, metadata={"help": "DPO max length", "min": 8})
    dpo_learning_rate: float = dataclasses.field(default=5e-5, metadata={"help": "DPO lr (LoRA)", "gt": 0})
    dpo_beta: float = dataclasses.field(default=0.1, metadata={"help": "DPO beta", "gt": 0})
    grpo_tasks: list[str] = dataclasses.field(
        default_factory=lambda: ["squad", "cf_world_facts"], metadata={"help": "GRPO reward tasks"}
    )
    grpo_n: int = dataclasses.field(default=32, metadata={"help": "GRPO prompts per task", "min": 1})
    grpo_max_steps: int = dataclasses.field(default=20, metadata={"help": "GRPO steps", "min": 1})
    grpo_learning_rate: float = dataclasses.field(default=2e-5, metadata={"help": "GRPO lr", "gt": 0})
    grpo_num_generations: int = dataclasses.field(default=2, metadata={"help": "completions per prompt"})
    grpo_max_completion_length: int = dataclasses.field(default=16, metadata={"help": "completion tokens"})
    eval_base: bool = dataclasses.field(default=True, metadata={"help": "evaluate the base model too"})
    eval_tasks: list[str] = dataclasses.field(
        default_factory=lambda: ["squad", "quac", "drop", "cf_world_facts", "nqswap"],
        metadata={"help": "evaluation tasks (ctxaware.data.tasks names)"},
    )
    eval_limit: int | None = dataclasses.field(
        default=100, metadata={"help": "examples per task (seeded sample)"}
    )
    eval_max_new_tokens: int = dataclasses.field(
        default=100, metadata={"help": "new tokens per answer (paper App. A.3: 100)"}
    )
    eval_batch_size: int = dataclasses.field(default=8, metadata={"help": "prompts per generation batch"})
    nih_lengths: list[int] = dataclasses.field(default_factory=list, metadata={"help": "NIH context lengths"})
    nih_depths: list[float] = dataclasses.field(
        default_factory=lambda: [0.0, 50.0, 100.0], metadata={"help": "NIH needle depths (%)"}
    )
    nih_conditions: list[str] = dataclasses.field(
        default_factory=lambda: ["chat+prefix", "plain+prefix", "chat"],
        metadata={"help": "NIH conditions: chat, plain, chat+prefix, plain+prefix"},
    )
    attention_lengths: list[int] = dataclasses.field(
        default_factory=list, metadata={"help": "attention analysis lengths (empty: none)"}
    )
    attention_depths: list[float] = dataclasses.field(
        default_factory=lambda: [0.0, 25.0, 50.0, 75.0, 100.0], metadata={"help": "attention depths (%)"}
    )
    mt_bench_limit: int = dataclasses.field(default=0, metadata={"help": "MT-Bench questions (0: none)"})
    mt_bench_max_new_tokens: int = dataclasses.field(default=256, metadata={"help": "MT-Bench answer tokens"})
    judge_local_model: str = dataclasses.field(default="default", metadata={"help": "offline judge model"})
    stages_n: int = dataclasses.field(
        default=0, metadata={"help": "stage analysis examples per task (0: none)"}
    )
    stages_tasks: list[str] = dataclasses.field(
        default_factory=lambda: ["squad", "cf_world_facts"], metadata={"help": "stage analysis tasks"}
    )


class _Timer:
    """Wall seconds per stage in ``timing.json`` (a stage served from its cache records nothing new)."""

    def __init__(self, root: Path) -> None:
        self.path = root / "timing.json"
        self.times = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def __call__(self, name: str, fn, *args, **kw):
        t0 = time.time()
        out = fn(*args, **kw)
        if time.time() - t0 > 1:
            self.times[name] = round(self.times.get(name, 0) + time.time() - t0, 1)
            write_json_atomic(self.path, self.times)
        return out


def _train_config(cfg: ExperimentConfig, cls: type = TrainConfig, **changes) -> TrainConfig:
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    return cls(**{**values, **changes})


def seed_spec(cfg: ExperimentConfig) -> str:
    """The seed model's spec as configured: ``trained`` or a model spec."""
    return cfg.seed_model


def stage_data(cfg: ExperimentConfig, root: Path) -> str:
    """``data_files`` cleaned (`ctxaware.data.conversations`: refusals, empty and incomplete turns removed),
    combined and shuffled with ``seed``, first ``max_conversations`` kept: ``data/sft.json``. Without
    ``data_files`` this is ``data``."""
    if not cfg.data_files:
        return str(cfg.data)
    out = root / "data" / "sft.json"
    meta = out.with_suffix(".sources.json")
    inputs = {"files": fingerprint_inputs({f: f for f in cfg.data_files}), "seed": cfg.seed,
              "limit": cfg.max_conversations}  # fmt: skip
    if out.is_file() and meta.is_file() and json.loads(meta.read_text()).get("inputs") == inputs:
        return str(out)
    tagged, counts = [], {}
    for f in cfg.data_files:
        part, _ = load_conversations(f, "auto")  # type: ignore[arg-type]
        counts[f] = len(part)
        stem = Path(f).name.split(".")[0]  # ids stay unique across files
        tagged += [(f, dataclasses.replace(c, id=f"{stem}:{c.id}")) for c in part]
    random.Random(cfg.seed).shuffle(tagged)
    tagged = tagged[: cfg.max_conversations] if cfg.max_conversations else tagged
    kept = {f: sum(src == f for src, _ in tagged) for f in cfg.data_files}
    write_conversations([c for _, c in tagged], out, "sharegpt")
    write_json_atomic(meta, {"inputs": inputs, "clean_per_file": counts, "n": len(tagged), "kept": kept})
    return str(out)


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
    """Eq. (2) scores of every assistant turn with the seed model (resumable in `ctxaware.scoring.score`; skipped
    when done under the same seed)."""
    from ctxaware.scoring.score import ScoreConfig, run

    seed_model = seed_model or seed_spec(cfg)
    out = root / "scores.jsonl"
    meta = root / "scores.seed.json"
    if out.with_suffix(".summary.json").is_file() and meta.is_file():
        if json.loads(meta.read_text()).get("seed_model") == seed_model:
            from ctxaware.scoring.selection import check_scored_data

            check_scored_data(out, str(cfg.data))  # data replaced at the same path: refused (docs/resume.md)
            return out
    optional = {"layer": cfg.score_layer, "max_tokens": cfg.score_max_tokens}
    run(ScoreConfig(data=str(cfg.data), model=seed_model, output=str(out), format=cfg.data_format,
                    limit=cfg.max_conversations, progress=False, **model_options(cfg, seed_model),
                    **{k: v for k, v in optional.items() if v is not None}))  # fmt: skip
    write_json_atomic(meta, {"seed_model": seed_model})
    return out


def stage_table3(cfg: ExperimentConfig, root: Path, scores_path: Path) -> dict[str, float]:
    """Paper Table 3: the fraction of scored turns selected at each of ``table3_betas``."""
    from ctxaware.scoring.selection import load_scores, ratio_table

    scores = load_scores(scores_path)
    table = ratio_table([r.get("score") for r in scores.values()], cfg.table3_betas)
    write_json_atomic(root / "table3.json", {"n_scored": len(scores), "ratio": table})
    return table


def stage_select(cfg: ExperimentConfig, root: Path, scores_path: Path, beta: float) -> Path:
    """The [IND]-marked copy of the training data for ``beta`` (same conversations, same order)."""
    out = root / "data" / f"marked_b{beta}.json"
    meta = out.with_suffix(".selection.json")
    inputs = {"data": cfg.data, "limit": cfg.max_conversations, "token": cfg.indicator_token, "beta": beta,
              "contents": fingerprint_inputs({"data": str(cfg.data)})["data"]}  # fmt: skip
    if out.is_file() and meta.is_file() and json.loads(meta.read_text()).get("inputs") == inputs:
        return out  # cached: the same data, rows, token and threshold
    from ctxaware.scoring.selection import load_scores, select

    convs, _ = load_conversations(
        cfg.data, cfg.data_format, split=cfg.data_split, limit=cfg.max_conversations
    )  # type: ignore[arg-type]
    marked, counts = select(convs, load_scores(scores_path), beta, cfg.indicator_token)
    write_conversations(marked, out)
    ratio = counts["n_selected"] / max(1, counts["n_scored"])
    write_json_atomic(meta, {"beta": beta, **counts, "ratio": ratio, "inputs": inputs})
    return out


def stage_train(cfg: ExperimentConfig, root: Path, name: str, data: str, indicator: bool) -> dict:
    """Train one SFT run (skipped when its summary exists; resumed from its last checkpoint otherwise)."""
    return train(_train_config(cfg, data=data, indicator=indicator, output_dir=str(root / "train" / name)))


def stage_post(cfg: ExperimentConfig, root: Path, stage: str, start: str) -> dict:
    """One post-SFT stage (``dpo`` or ``grpo``) from the model dir ``start``, LoRA merged on save."""
    from ctxaware.training.finetune import run_stage
    from ctxaware.training.preference import DPOStageConfig
    from ctxaware.training.rlvr import GRPOStageConfig

    out = str(root / "train" / stage)
    common = {"model": start, "output_dir": out, "stage": stage, "indicator": False, "chat_template": "model"}
    if stage == "dpo":
        scfg = _train_config(cfg, DPOStageConfig, **common, data=cfg.dpo_data, max_pairs=cfg.dpo_max_pairs,
                             max_length=cfg.dpo_max_length, learning_rate=cfg.dpo_learning_rate,
                             beta=cfg.dpo_beta, max_steps=-1)  # fmt: skip
    else:
        scfg = _train_config(cfg, GRPOStageConfig, **common, data=None, rl_tasks=cfg.grpo_tasks,
                             rl_n=cfg.grpo_n, max_steps=cfg.grpo_max_steps, learning_rate=cfg.grpo_learning_rate,
                             num_generations=cfg.grpo_num_generations, lr_scheduler_type="constant",
                             warmup_ratio=0.0, max_completion_length=cfg.grpo_max_completion_length,
                             max_length=512)  # fmt: skip
    return run_stage(scfg)


def template_file(root: Path, cfg: ExperimentConfig) -> str:
    """The training chat template as a file, so every checkpoint (the base too) is evaluated with it."""
    path = root / "template.jinja"
    if cfg.chat_template in ("zephyr", None):
        text = ZEPHYR_TEMPLATE
    elif cfg.chat_template.endswith((".jinja", ".j2")):
        text = Path(cfg.chat_template).read_text()
    else:
        return "model"
    if not path.is_file() or path.read_text() != text:
        write_text_atomic(path, text)
    return str(path)


def model_options(cfg: ExperimentConfig, model_dir: str) -> dict:
    """The experiment's model options for a stage that loads ``model_dir`` (issue 24 §1): every `ModelConfig`
    field (device, dtype, attention kernel, device map, remote code), and the revision where the stage
    loads the configured base itself (a trained checkpoint is a local directory: no revision)."""
    from ctxaware.core.config import ModelConfig

    opts = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig) if f.name != "model"}
    opts.update(quantization=None, peft_adapter=None)  # training's own QLoRA loading is not an eval option
    if model_dir != cfg.model:
        opts["revision"] = None
    return opts


def stage_evaluate(
    cfg: ExperimentConfig, root: Path, name: str, model_dir: str, indicator: bool, mode: str = "chat"
) -> dict:
    """QA/conflict tasks and MT-Bench for one model in one ``mode``; rows resume in ``eval/{name}/`` (plain:
    ``eval/{name}/plain/``); cached in ``results.json`` there. The base is evaluated as the paper's base rows
    are, without a template (``mode="plain"``), and with the training template as extra information."""
    from ctxaware.evaluation.qa import EvalConfig, evaluate_tasks

    where = root / "eval" / name / ("plain" if mode == "plain" else "")
    template = template_file(root, cfg)
    base = dict(model=model_dir, modes=[mode], indicator=indicator, seed=cfg.seed, data_dir=None,
                batch_size=cfg.eval_batch_size, output=str(where), **model_options(cfg, model_dir))  # fmt: skip
    ecfg = EvalConfig(**base, limit=cfg.eval_limit, max_new_tokens=cfg.eval_max_new_tokens)
    mt_bench = bool(cfg.mt_bench_limit and mode == "chat")
    stage = {**to_dict(ecfg), "tasks": cfg.eval_tasks, "chat_template": template,
             "mt_bench_limit": cfg.mt_bench_limit if mt_bench else 0,
             "mt_bench_max_new_tokens": cfg.mt_bench_max_new_tokens if mt_bench else None,
             "judge_local_model": cfg.judge_local_model if mt_bench else None}  # fmt: skip

    def compute() -> dict:
        from ctxaware.data.needle import apply_chat_template_choice

        model, tok = ecfg.load()  # every model option of the experiment (ModelConfig.load)
        apply_chat_template_choice(tok, template)  # as nih and attention do
        results = evaluate_tasks(model, tok, cfg.eval_tasks, ecfg, model_name=name, output_dir=where)
        if mt_bench:  # the offline judge (evaluate.make_judge: judge_local_model)
            mcfg = EvalConfig(**base, limit=cfg.mt_bench_limit, mt_bench_max_new_tokens=cfg.mt_bench_max_new_tokens,
                              judge="local", judge_local_model=cfg.judge_local_model)  # fmt: skip
            results.update(evaluate_tasks(model, tok, ["mt_bench"], mcfg, model_name=name,
                                          output_dir=root / "eval" / name))  # fmt: skip
        return results

    return cached_stage(where, "results.json", stage, compute)


def cached_stage(where: Path, filename: str, stage_config: dict, compute) -> dict:
    """A stage's JSON result ``where/filename``, reused only when the stage ran with this configuration and
    these input contents (the content fingerprint `ResultsWriter` uses, recorded in ``where/stage.json``);
    computed when missing. A different configuration is refused in one line, as every command refuses to
    mix runs: change ``eval_limit`` and rerun, and the old numbers do not come back (issue 24 §2)."""
    from ctxaware.core.results import config_changes, run_record

    done, record = where / filename, where / "stage.json"
    if done.is_file() and record.is_file():
        old = json.loads(record.read_text())
        changed = config_changes(old.get("config", {}), old.get("inputs"), stage_config)
        if changed:
            raise CtxawareError(
                f"{where} holds this stage's results for another configuration (differs in: "
                f"{', '.join(changed)}); use another output_dir, or delete {where} to recompute it"
            )
        return json.loads(done.read_text())
    write_json_atomic(record, run_record(stage_config))  # a run from before stages recorded it: recorded now
    if done.is_file():
        return json.loads(done.read_text())
    out = compute()
    if not done.is_file():  # commands that write their own summary (attention, stages) have written it
        write_json_atomic(done, out)
    return out


NIH_CONDITIONS = {"chat+prefix": ("chat", True), "plain+prefix": ("plain", True), "chat": ("chat", False),
                  "plain": ("plain", False)}  # fmt: skip


def stage_nih(cfg: ExperimentConfig, root: Path, name: str, model_dir: str, indicator: bool) -> dict:
    """NIH (authors' protocol) under ``nih_conditions``: ``{condition: summary}`` (rows resume)."""
    from ctxaware.evaluation import nih

    configs = []
    for prefix in (True, False):
        modes = [m for c, (m, p) in NIH_CONDITIONS.items() if c in cfg.nih_conditions and p == prefix]
        if modes:
            configs.append(nih.NIHConfig(model=model_dir, **model_options(cfg, model_dir),
                                         lengths=cfg.nih_lengths, depths=cfg.nih_depths, modes=modes,
                                         indicator=[indicator], prefix=[prefix], chat_template=template_file(root, cfg),
                                         output=str(root / "nih" / name / ("prefix" if prefix else "no_prefix"))))  # fmt: skip

    def compute() -> dict:
        out: dict = {}
        for ncfg in configs:
            short, rows = nih.run_model(ncfg, model_dir)
            out.update(nih.report(Path(ncfg.output), short, rows))
        return out

    stage = {"model": model_dir, "runs": [to_dict(c) for c in configs]}
    return cached_stage(root / "nih" / name, "results.json", stage, compute)


def stage_attention(cfg: ExperimentConfig, root: Path, name: str, model_dir: str) -> dict:
    """Attention per role (three normalisations, Fig. 3-4) on NIH prompts; ``attention/{name}/``."""
    from ctxaware.attention import allocation as attention

    where = root / "attention" / name
    acfg = attention.AttentionConfig(model=model_dir, **model_options(cfg, model_dir),
                                     lengths=cfg.attention_lengths, depths=cfg.attention_depths,
                                     chat_template=template_file(root, cfg), output=str(where))  # fmt: skip
    return cached_stage(
        where, "allocation.json", to_dict(acfg), lambda: attention.run_one(acfg, model_dir, where)
    )


def stage_stages(cfg: ExperimentConfig, root: Path, chain: dict[str, str]) -> dict:
    """The stage analysis (`ctxaware stages`) over base -> vanilla SFT -> DPO -> GRPO."""
    from ctxaware.evaluation.stages import StagesConfig, run

    scfg = StagesConfig(checkpoints=[f"{k}={v}" for k, v in chain.items()], tasks=cfg.stages_tasks,
                        n=cfg.stages_n, mode="zephyr" if cfg.chat_template == "zephyr" else "auto",
                        seed=cfg.seed, output=str(root / "stages"), **model_options(cfg, ""))  # fmt: skip
    return cached_stage(root / "stages", "summary.json", to_dict(scfg), lambda: run(scfg))


def paired(root: Path, a: str, b: str, task: str, metric: str) -> dict:
    """Paired difference ``b - a`` of a per-example metric on the same examples (bootstrap 95% CI)."""
    from ctxaware.core.stats import summarize

    def rows(name: str) -> dict:
        out = {}
        for r in read_jsonl(root / "eval" / name / task / "rows.jsonl"):
            if isinstance(r.get("scores"), dict) and r["scores"].get(metric) is not None:
                out[r["id"]] = float(r["scores"][metric])
        return out

    ra, rb = rows(a), rows(b)
    return summarize([rb[i] - ra[i] for i in ra if i in rb])


QA_METRIC = {"qa": "contains", "conflict": "p_s"}


def compare(root: Path, runs: dict[str, dict], extra: dict) -> str:
    """``comparison.md``: Table 3, Table 4 (tasks x checkpoints, 95% CIs), paired differences against the
    vanilla SFT, NIH per checkpoint and condition, attention per role, the inversion curves and the stage
    analysis; ``comparison.json`` holds everything."""
    from ctxaware.core.plotting import context_reliance_steps
    from ctxaware.core.stats import fmt
    from ctxaware.evaluation.qa import summary_markdown

    parts = []
    if extra.get("table3"):
        from ctxaware.scoring.selection import format_table

        parts.append(
            "## Table 3: ratio of selected turns\n\n" + format_table({"training data": extra["table3"]})
        )
    evals = {name: {"chat": r["eval"]} for name, r in runs.items() if r.get("eval")}
    if evals:
        parts.append(
            "## Table 4 analogue (percent; 95% exact CI for proportions, bootstrap for F1; the base without a template)\n\n"
            + summary_markdown(evals)
        )
    ref = "vanilla"
    lines = []
    for name, r in runs.items():
        if name == ref or not r.get("eval"):
            continue
        for task, res in r["eval"].items():
            metric = QA_METRIC.get(res.get("kind"))
            if metric:
                d = paired(root, runs[ref]["slug"], r["slug"], task, metric)
                lines.append(f"| {name} - {ref} | {task} | {metric} | {fmt(d)} | {d['n']} |")
    if lines:
        parts.append("## Paired differences against the vanilla SFT (same examples)\n\n"
                     "| runs | task | metric | difference (points) [95% CI] | n |\n|---|---|---|---|---|\n"
                     + "\n".join(lines))  # fmt: skip
    nih_lines = [f"| {name} | {cond} | {fmt(s['recall'])} | {100 * s['empty_rate']:.1f} | {s['n']} |"
                 for name, r in runs.items() for cond, s in (r.get("nih") or {}).items()]  # fmt: skip
    if nih_lines:
        parts.append("## NIH (authors' protocol): recall % [95% CI]\n\n| run | condition | recall | empty % | n |\n"
                     "|---|---|---|---|---|\n" + "\n".join(nih_lines))  # fmt: skip
    att = []
    for name, r in runs.items():
        for cond, v in ((r.get("attention") or {}).get("conditions") or {}).items():
            att.append(f"| {name} | {cond} | {v['head']} | {v['raw']['user']:.3f} | {v['paper']['user']:.3f} | "
                       f"{v['paper']['sink']:.3f} | {v['sink_excluded']['user']:.3f} |")  # fmt: skip
    if att:
        parts.append("## Attention to user tokens at the last prompt token (mean over prompts)\n\n"
                     "| run | condition | head | raw user | paper user | paper sink | sink-excluded user |\n"
                     "|---|---|---|---|---|---|---|\n" + "\n".join(att))  # fmt: skip
    curves = {name: r["train"]["context_reliance"] for name, r in runs.items()
              if (r.get("train") or {}).get("context_reliance")}  # fmt: skip
    if curves:
        context_reliance_steps(curves, root / "context_reliance.png")
        rows = [
            f"| {name} | {p['step']} | {p['p_s']:.3f} | {p['p_o']:.3f} |"
            for name, c in curves.items()
            for p in c
        ]
        parts.append("## Context reliance during training (held-out counterfactuals)\n\n| run | step | p_s | p_o |\n"
                     "|---|---|---|---|\n" + "\n".join(rows) + "\n\n![context reliance](context_reliance.png)")  # fmt: skip
    if extra.get("stages"):
        from ctxaware.evaluation.stages import summary_markdown

        parts.append("## Stage analysis (usage pooled over tasks, mean [95% CI])\n\n"
                     + summary_markdown(extra["stages"])
                     + "\n\n![sensitivity](stages/sensitivity.png)\n\n![head change](stages/head_change.png)")  # fmt: skip
    text = "\n\n".join(parts) + "\n"
    write_text_atomic(root / "comparison.md", text)
    write_json_atomic(root / "comparison.json", {"runs": runs, **extra})
    return text


def run(cfg: ExperimentConfig) -> str:
    if not cfg.data and not cfg.data_files:
        raise CtxawareError(
            "no data; set data: PATH or data_files: [PATH, ...] (the SFT data to score and train on)"
        )
    if not cfg.betas:
        raise CtxawareError("betas is empty; give at least one threshold, e.g. betas: [0.6]")
    bad = [s for s in cfg.post_stages if s not in POST_STAGES] + [
        c for c in cfg.nih_conditions if c not in NIH_CONDITIONS
    ]
    if bad:
        raise CtxawareError(f"{bad[0]!r} is not a post stage ({', '.join(POST_STAGES)}) or NIH condition "
                            f"({', '.join(NIH_CONDITIONS)})")  # fmt: skip
    for f in cfg.data_files:
        if not Path(f).is_file():
            raise CtxawareError(f"data file {f} does not exist; fix data_files")
    root = Path(cfg.output_dir)
    timer = _Timer(root)
    cfg.data = timer("data", stage_data, cfg, root)
    seed_model, seed_summary = timer("train vanilla (seed)", stage_seed, cfg, root)
    scores = timer("score", stage_score, cfg, root, seed_model)
    extra: dict = {"table3": stage_table3(cfg, root, scores)}
    plan = {"vanilla": (str(cfg.data), False)}
    for beta in cfg.betas:
        plan[f"+indicator b={beta}"] = (str(stage_select(cfg, root, scores, beta)), True)
    runs: dict[str, dict] = {}
    if cfg.eval_base:
        runs["base"] = {"slug": "base", "model_dir": cfg.model, "indicator": False, "train": {}}
    for name, (data, indicator) in plan.items():
        slug = name.replace("+", "ind_").replace(" b=", "_b").replace(" ", "_")
        summary = timer(f"train {slug}", stage_train, cfg, root, slug, data, indicator)
        runs[name] = {
            "slug": slug,
            "model_dir": summary["model_dir"],
            "indicator": indicator,
            "train": summary,
        }
        if indicator:
            runs[name]["selection"] = json.loads(Path(data).with_suffix(".selection.json").read_text())
    start = runs["vanilla"]["model_dir"]
    for stage in cfg.post_stages:
        summary = timer(f"train {stage}", stage_post, cfg, root, stage, start)
        runs[stage] = {"slug": stage, "model_dir": summary["model_dir"], "indicator": False, "train": summary}
        start = summary["model_dir"]
    for r in runs.values():
        slug, md, ind = r["slug"], r["model_dir"], r["indicator"]
        if slug == "base":  # the paper's base rows: no template; the training template's view beside it
            r["eval"] = timer("eval base (plain)", stage_evaluate, cfg, root, slug, md, ind, "plain")
            r["eval_chat_template"] = timer("eval base (chat)", stage_evaluate, cfg, root, slug, md, ind)
        else:
            r["eval"] = timer(f"eval {slug}", stage_evaluate, cfg, root, slug, md, ind)
        if cfg.nih_lengths:
            r["nih"] = timer(f"nih {slug}", stage_nih, cfg, root, slug, md, ind)
        if cfg.attention_lengths:
            r["attention"] = timer(f"attention {slug}", stage_attention, cfg, root, slug, md)
    if cfg.stages_n:
        chain = {k: runs[k]["model_dir"] for k in ("base", "vanilla", *cfg.post_stages) if k in runs}
        extra["stages"] = timer("stages", stage_stages, cfg, root, chain)
    extra["timing"] = timer.times
    return compare(root, runs, extra)


HELP = (
    "The paper's experiment from one YAML: clean and combine the SFT data, train the vanilla SFT (the seed), "
    "score every turn with eq. (2), Table 3, mark [IND] turns, train the +indicator SFT (and DPO, GRPO), "
    "evaluate every checkpoint (QA, conflict, NIH, attention, MT-Bench) and compare them. Every stage is "
    "cached under output_dir: rerun the same command to resume. docs/experiment/gemma.yaml (Gemma-3-270M, "
    "20-step LoRA runs, n=50 per task) took about 2 h 20 min on a 2-core CPU (docs/experiment.md). The "
    "options below are the training options, applied to every SFT run, then the experiment's own."
)


def main(argv: list[str]) -> int:
    """``ctxaware experiment CONFIG.yaml [--option value ...]``."""
    argv = list(argv)
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml")):
        argv = ["--config", *argv]
    if any(a in ("-h", "--help") for a in argv):
        from ctxaware.training.finetune import print_help

        return print_help(ExperimentConfig, "ctxaware experiment", HELP)
    cfg = parse_config(ExperimentConfig, argv, prog="ctxaware experiment")
    from ctxaware.core.results import exclusive

    with exclusive(cfg.output_dir, ".experiment.lock"):  # one experiment per output directory
        print(run(cfg))
    print(f"\nwritten: {Path(cfg.output_dir) / 'comparison.md'}")
    return 0
