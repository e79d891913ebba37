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

Every step caches its output under ``output_dir``; a rerun (after a kill at any point) skips what is
finished and resumes training from its last checkpoint. Layout: ``data/``, ``scores.jsonl``,
``table3.json``, ``train/{run}/``, ``eval/{run}/``, ``nih/{run}/``, ``attention/{run}/``, ``stages/``,
``comparison.md``, ``context_reliance.png``, ``timing.json``. This module only wires the other modules.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

from ctxaware.core.config import Checked, ModelConfig, to_dict
from ctxaware.core.errors import CtxawareError
from ctxaware.core.results import fingerprint_inputs, read_jsonl, write_json_atomic, write_text_atomic
from ctxaware.data.conversations import load_conversations, write_conversations
from ctxaware.training.sft import ZEPHYR_TEMPLATE, TrainConfig, train

logger = logging.getLogger(__name__)
POST_STAGES = ("dpo", "grpo")
NIH_CONDITIONS = {"chat+prefix": ("chat", True), "plain+prefix": ("plain", True), "chat": ("chat", False),
                  "plain": ("plain", False)}  # fmt: skip


MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
# per section: the fields the experiment sets itself (the model options come from the model section)
SET_BY_EXPERIMENT = {
    "train": ("output_dir", "indicator", "stage", "data"),
    "score": ("data", "output", "format", "split", "limit", "progress", "overwrite"),
    "eval": ("modes", "indicator", "output", "overwrite", "dump_prompts"),
    "nih": ("modes", "prefix", "indicator", "chat_template", "output", "overwrite", "dump_prompts"),
    "attention": ("chat_template", "output", "overwrite", "dump_prompts"),
    "stages": ("checkpoints", "mode", "output"),
    "dpo": ("output_dir", "indicator", "stage", "chat_template"),
    "grpo": ("output_dir", "indicator", "stage", "chat_template", "data"),
}
RENAMED = {  # the experiment's flat options before its config had sections (issue 24 section 1)
    "score_layer": "score.layer", "score_max_tokens": "score.max_tokens", "dpo_data": "dpo.data",
    "dpo_max_pairs": "dpo.max_pairs", "dpo_max_length": "dpo.max_length",
    "dpo_learning_rate": "dpo.learning_rate", "dpo_beta": "dpo.beta", "grpo_tasks": "grpo.rl_tasks",
    "grpo_n": "grpo.rl_n", "grpo_max_steps": "grpo.max_steps", "grpo_learning_rate": "grpo.learning_rate",
    "grpo_num_generations": "grpo.num_generations", "grpo_max_completion_length": "grpo.max_completion_length",
    "eval_tasks": "eval.tasks", "eval_limit": "eval.limit", "eval_max_new_tokens": "eval.max_new_tokens",
    "eval_batch_size": "eval.batch_size", "nih_lengths": "nih.lengths", "nih_depths": "nih.depths",
    "attention_lengths": "attention.lengths", "attention_depths": "attention.depths",
    "mt_bench_max_new_tokens": "eval.mt_bench_max_new_tokens", "judge_local_model": "eval.judge_local_model",
    "stages_n": "stages.n", "stages_tasks": "stages.tasks",
    **{f: f"model.{f}" for f in MODEL_FIELDS},
}  # fmt: skip
RENAMED |= {f.name: f"train.{f.name}" for f in dataclasses.fields(TrainConfig) if f.name not in RENAMED}
RENAMED["model"] = "model.model (or model: NAME)"


def _section_types() -> dict[str, type]:
    from ctxaware.attention.allocation import AttentionConfig
    from ctxaware.evaluation.nih import NIHConfig
    from ctxaware.evaluation.qa import EvalConfig
    from ctxaware.evaluation.stages import StagesConfig
    from ctxaware.scoring.score import ScoreConfig
    from ctxaware.training.preference import DPOStageConfig
    from ctxaware.training.rlvr import GRPOStageConfig

    return {"model": ModelConfig, "train": TrainConfig, "score": ScoreConfig, "eval": EvalConfig,
            "nih": NIHConfig, "attention": AttentionConfig, "stages": StagesConfig, "dpo": DPOStageConfig,
            "grpo": GRPOStageConfig}  # fmt: skip


OPTIONAL_SECTIONS = ("nih", "attention", "stages")  # absent: that measurement is not run


@dataclasses.dataclass
class ExperimentConfig(Checked):
    """The experiment's own options plus one section per command it runs, each that command's own config
    (TRL's scripts compose ``ScriptArguments``, ``SFTConfig`` and ``ModelConfig`` the same way):

    ``model`` (`ModelConfig`: the base and how every step loads a model), ``train`` (`TrainConfig`: every
    SFT run), ``score`` (eq. 2), ``eval`` (QA, conflict, MT-Bench), ``nih``, ``attention`` and ``stages``
    (each run only when its section is given), ``dpo`` and ``grpo`` (the ``post_stages``). A section holds
    only the options that command takes, with that command's defaults; the experiment sets the rest
    (`SET_BY_EXPERIMENT`: outputs under ``output_dir``, data, which model, the template) and derives each
    step's config from its section with ``dataclasses.replace``. In YAML a section is a nested mapping; on
    the command line ``--SECTION.OPTION VALUE`` (``--eval.limit 200``).

    Parameters:
        data / data_files: the SFT data, or sets combined into ``data/sft.json`` (cleaned, shuffled with
            ``train.seed``, first ``train.max_conversations``).
        seed_model: the model that scores the data (eq. 2): ``trained`` (the paper's choice: the vanilla SFT
            of the base on ``data``, trained first as a step) or a model spec used as it is.
        betas: thresholds; one +indicator run per beta (the first is the headline, more give Table 9).
        table3_betas: thresholds whose selected ratio is reported (paper Table 3).
        post_stages: ``dpo`` and/or ``grpo``, trained in that order from the vanilla SFT model.
        eval_base: evaluate the base model too: without a template (the paper's base rows), and with the
            training template as extra information.
        nih_conditions: which of ``chat+prefix``, ``plain+prefix``, ``chat``, ``plain`` the ``nih`` section runs.
        mt_bench_limit: MT-Bench questions per run, judged as the ``eval`` section says (0: none).
    """

    output_dir: str = dataclasses.field(
        default="runs/experiment", metadata={"help": "the experiment's directory", "path": "output_dir"}
    )
    data: str | None = dataclasses.field(
        default=None, metadata={"help": "SFT data (file, directory or hub dataset)", "path": "input"}
    )
    data_files: list[str] = dataclasses.field(
        default_factory=list, metadata={"help": "SFT sets to clean, combine and shuffle (empty: data)"}
    )
    seed_model: str = dataclasses.field(
        default="trained",
        metadata={
            "help": "seed model for eq. (2): trained (vanilla SFT of model on data, the paper's) or a spec"
        },
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
    eval_base: bool = dataclasses.field(default=True, metadata={"help": "evaluate the base model too"})
    nih_conditions: list[str] = dataclasses.field(
        default_factory=lambda: ["chat+prefix", "plain+prefix", "chat"],
        metadata={"help": "NIH conditions: chat, plain, chat+prefix, plain+prefix"},
    )
    mt_bench_limit: int = dataclasses.field(
        default=0, metadata={"help": "MT-Bench questions (0: none)", "min": 0}
    )
    model: ModelConfig | str | dict = dataclasses.field(
        default_factory=ModelConfig,
        metadata={"help": "the base model and how every step loads models", "section": True},
    )
    train: TrainConfig | dict = dataclasses.field(
        default_factory=dict, metadata={"help": "ctxaware train", "section": True}
    )
    score: Any = dataclasses.field(
        default_factory=dict, metadata={"help": "ctxaware score (eq. 2)", "section": True}
    )
    eval: Any = dataclasses.field(default_factory=dict, metadata={"help": "ctxaware eval", "section": True})
    nih: Any = dataclasses.field(
        default=None, metadata={"help": "ctxaware nih (absent: no NIH)", "section": True}
    )
    attention: Any = dataclasses.field(
        default=None, metadata={"help": "ctxaware attention (absent: none)", "section": True}
    )
    stages: Any = dataclasses.field(
        default=None, metadata={"help": "ctxaware stages (absent: no stage analysis)", "section": True}
    )
    dpo: Any = dataclasses.field(
        default_factory=dict, metadata={"help": "the DPO stage (post_stages)", "section": True}
    )
    grpo: Any = dataclasses.field(
        default_factory=dict, metadata={"help": "the GRPO stage (post_stages)", "section": True}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        types = _section_types()
        if isinstance(self.model, str):
            self.model = ModelConfig(model=self.model)
        self.model = _section("model", types["model"], self.model, {})
        fixed = {f: getattr(self.model, f) for f in MODEL_FIELDS}
        for name in ("train", "score", "eval", "nih", "attention", "stages", "dpo", "grpo"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _section(name, types[name], value, {**fixed, **self._placeholders(name)}))
        bad = [s for s in self.post_stages if s not in POST_STAGES] + [
            c for c in self.nih_conditions if c not in NIH_CONDITIONS
        ]
        if bad:
            raise CtxawareError(f"{bad[0]!r} is not a post stage ({', '.join(POST_STAGES)}) or NIH condition "
                                f"({', '.join(NIH_CONDITIONS)})")  # fmt: skip

    def _placeholders(self, name: str) -> dict:
        """The experiment-set fields of a section, with the values its stages start from (so that a section
        is validated where it will write, and never against a default path in the working directory)."""
        root = Path(self.output_dir)
        return {
            "train": {"output_dir": str(root / "train"), "data": self.data},
            "score": {"output": str(root / "scores.jsonl"), "progress": False},
            "eval": {"output": str(root / "eval")},
            "nih": {"output": str(root / "nih")},
            "attention": {"output": str(root / "attention")},
            "stages": {"output": str(root / "stages")},
            "dpo": {"output_dir": str(root / "train" / "dpo"), "chat_template": "model"},
            "grpo": {"output_dir": str(root / "train" / "grpo"), "chat_template": "model", "data": None},
        }[name]


def _section(name: str, cls: type, value: Any, fixed: dict) -> Any:
    """One section as its command's config: a mapping (YAML, ``--SECTION.OPTION``) is checked for options
    the experiment sets itself, then built with them (validated when built, `Checked`); a config object
    made in Python gets them by ``dataclasses.replace``."""
    from ctxaware.core.config import from_dict

    if isinstance(value, cls):
        return dataclasses.replace(value, **fixed)
    if not isinstance(value, dict):
        raise CtxawareError(f"{name}: expected a mapping of {cls.__name__} options, got {value!r}")
    norm = {k.replace("-", "_"): v for k, v in value.items()}
    for key in norm:
        if name != "model" and key in MODEL_FIELDS:
            raise CtxawareError(f"{name}.{key}: model options are set once, under model: (model.{key})")
        if key in SET_BY_EXPERIMENT.get(name, ()):
            raise CtxawareError(f"{name}.{key} is set by the experiment (outputs go under output_dir, "
                                "data and models follow the stages); remove it")  # fmt: skip
    try:
        return from_dict(cls, {**norm, **fixed}, source=f"section {name}")
    except CtxawareError as e:
        raise CtxawareError(str(e) if str(e).startswith(("unknown", "section")) else f"{name}: {e}") from None


class _Timer:
    """Wall seconds per step in ``timing.json`` (a step served from its cache records nothing new)."""

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


def seed_spec(cfg: ExperimentConfig) -> str:
    """The seed model's spec as configured: ``trained`` or a model spec."""
    return cfg.seed_model


def step_data(cfg: ExperimentConfig, root: Path) -> str:
    """``data_files`` cleaned (`ctxaware.data.conversations`: refusals, empty and incomplete turns removed),
    combined and shuffled with ``train.seed``, first ``train.max_conversations`` kept: ``data/sft.json``.
    Without ``data_files`` this is ``data``."""
    if not cfg.data_files:
        return str(cfg.data)
    out = root / "data" / "sft.json"
    meta = out.with_suffix(".sources.json")
    seed, limit = cfg.train.seed, cfg.train.max_conversations
    inputs = {"files": fingerprint_inputs({f: f for f in cfg.data_files}), "seed": seed, "limit": limit}
    if out.is_file() and meta.is_file() and json.loads(meta.read_text()).get("inputs") == inputs:
        return str(out)
    tagged, counts = [], {}
    for f in cfg.data_files:
        part, _ = load_conversations(f, "auto")  # type: ignore[arg-type]
        counts[f] = len(part)
        stem = Path(f).name.split(".")[0]  # ids stay unique across files
        tagged += [(f, dataclasses.replace(c, id=f"{stem}:{c.id}")) for c in part]
    random.Random(seed).shuffle(tagged)
    tagged = tagged[:limit] if limit else tagged
    kept = {f: sum(src == f for src, _ in tagged) for f in cfg.data_files}
    write_conversations([c for _, c in tagged], out, "sharegpt")
    write_json_atomic(meta, {"inputs": inputs, "clean_per_file": counts, "n": len(tagged), "kept": kept})
    return str(out)


def step_seed(cfg: ExperimentConfig, root: Path) -> tuple[str, dict | None]:
    """The seed model for eq. (2): ``(model spec or dir, training summary or None)``. With ``seed_model:
    trained`` this trains (or resumes, or reuses) ``train/vanilla``: the paper's seed is a vanilla SFT of the
    base on the same data with the training template, which is exactly the vanilla run."""
    spec = seed_spec(cfg)
    if spec != "trained":
        return spec, None
    summary = step_train(cfg, root, "vanilla", str(cfg.data), False)
    return summary["model_dir"], summary


def step_score(cfg: ExperimentConfig, root: Path, seed_model: str | None = None) -> Path:
    """Eq. (2) scores of every assistant turn with the seed model (the ``score`` section; resumable in
    `ctxaware.scoring.score`; skipped when done under the same seed)."""
    from ctxaware.scoring.score import run

    seed_model = seed_model or seed_spec(cfg)
    out = root / "scores.jsonl"
    meta = root / "scores.seed.json"
    if out.with_suffix(".summary.json").is_file() and meta.is_file():
        if json.loads(meta.read_text()).get("seed_model") == seed_model:
            from ctxaware.scoring.selection import check_scored_data

            check_scored_data(out, str(cfg.data))  # data replaced at the same path: refused (docs/resume.md)
            return out
    run(dataclasses.replace(cfg.score, data=str(cfg.data), output=str(out), format=cfg.train.data_format,
                            limit=cfg.train.max_conversations, **model_options(cfg, seed_model)))  # fmt: skip
    write_json_atomic(meta, {"seed_model": seed_model})
    return out


def step_table3(cfg: ExperimentConfig, root: Path, scores_path: Path) -> dict[str, float]:
    """Paper Table 3: the fraction of scored turns selected at each of ``table3_betas``."""
    from ctxaware.scoring.selection import load_scores, ratio_table

    scores = load_scores(scores_path)
    table = ratio_table([r.get("score") for r in scores.values()], cfg.table3_betas)
    write_json_atomic(root / "table3.json", {"n_scored": len(scores), "ratio": table})
    return table


def step_select(cfg: ExperimentConfig, root: Path, scores_path: Path, beta: float) -> Path:
    """The [IND]-marked copy of the training data for ``beta`` (same conversations, same order)."""
    out = root / "data" / f"marked_b{beta}.json"
    meta = out.with_suffix(".selection.json")
    t = cfg.train
    inputs = {"data": cfg.data, "limit": t.max_conversations, "token": t.indicator_token, "beta": beta,
              "contents": fingerprint_inputs({"data": str(cfg.data)})["data"]}  # fmt: skip
    if out.is_file() and meta.is_file() and json.loads(meta.read_text()).get("inputs") == inputs:
        return out  # cached: the same data, rows, token and threshold
    from ctxaware.scoring.selection import load_scores, select

    convs, _ = load_conversations(cfg.data, t.data_format, split=t.data_split, limit=t.max_conversations)  # type: ignore[arg-type]
    marked, counts = select(convs, load_scores(scores_path), beta, t.indicator_token)
    write_conversations(marked, out)
    ratio = counts["n_selected"] / max(1, counts["n_scored"])
    write_json_atomic(meta, {"beta": beta, **counts, "ratio": ratio, "inputs": inputs})
    return out


def step_train(cfg: ExperimentConfig, root: Path, name: str, data: str, indicator: bool) -> dict:
    """Train one SFT run (the ``train`` section; skipped when its summary exists; resumed from its last
    checkpoint otherwise)."""
    return train(
        dataclasses.replace(cfg.train, data=data, indicator=indicator, output_dir=str(root / "train" / name))
    )


def step_post_training(cfg: ExperimentConfig, root: Path, stage: str, start: str) -> dict:
    """One post-SFT stage (the ``dpo`` or ``grpo`` section) from the model dir ``start``, LoRA merged on
    save."""
    from ctxaware.training.finetune import run_stage

    section = cfg.dpo if stage == "dpo" else cfg.grpo
    return run_stage(dataclasses.replace(section, output_dir=str(root / "train" / stage),
                                         **model_options(cfg, start)))  # fmt: skip


def template_file(root: Path, cfg: ExperimentConfig) -> str:
    """The training chat template as a file, so every checkpoint (the base too) is evaluated with it."""
    path = root / "template.jinja"
    choice = cfg.train.chat_template
    if choice in ("zephyr", None):
        text = ZEPHYR_TEMPLATE
    elif choice.endswith((".jinja", ".j2")):
        text = Path(choice).read_text()
    else:
        return "model"
    if not path.is_file() or path.read_text() != text:
        write_text_atomic(path, text)
    return str(path)


def model_options(cfg: ExperimentConfig, model_dir: str) -> dict:
    """The model section's options for a step that loads ``model_dir``: every `ModelConfig` field, with
    ``model`` = ``model_dir``; a trained checkpoint (anything but the configured base) is a local directory
    of a merged model, so it takes no revision, adapter or quantised loading."""
    opts = {f: getattr(cfg.model, f) for f in MODEL_FIELDS}
    opts["model"] = model_dir
    if model_dir != cfg.model.model:
        opts.update(revision=None, peft_adapter=None, quantization=None)
    return opts


def step_evaluate(
    cfg: ExperimentConfig, root: Path, name: str, model_dir: str, indicator: bool, mode: str = "chat"
) -> dict:
    """QA/conflict tasks (the ``eval`` section) and MT-Bench for one model in one ``mode``; rows resume in
    ``eval/{name}/`` (plain: ``eval/{name}/plain/``); cached in ``results.json`` there. The base is
    evaluated as the paper's base rows are, without a template (``mode="plain"``), and with the training
    template as extra information."""
    from ctxaware.evaluation.qa import evaluate_tasks

    where = root / "eval" / name / ("plain" if mode == "plain" else "")
    template = template_file(root, cfg)
    ecfg = dataclasses.replace(cfg.eval, modes=[mode], indicator=indicator, output=str(where),
                               **model_options(cfg, model_dir))  # fmt: skip
    tasks = [t for t in ecfg.tasks if t != "mt_bench"]
    mt_bench = bool(cfg.mt_bench_limit and mode == "chat")
    step = {**to_dict(ecfg), "tasks": tasks, "chat_template": template,
             "mt_bench_limit": cfg.mt_bench_limit if mt_bench else 0,
             "mt_bench_max_new_tokens": ecfg.mt_bench_max_new_tokens if mt_bench else None,
             "judge_local_model": ecfg.judge_local_model if mt_bench else None}  # fmt: skip

    def compute() -> dict:
        from ctxaware.data.needle import apply_chat_template_choice

        model, tok = ecfg.load()  # every model option of the experiment (ModelConfig.load)
        apply_chat_template_choice(tok, template)  # as nih and attention do
        results = evaluate_tasks(model, tok, tasks, ecfg, model_name=name, output_dir=where)
        if mt_bench:  # judged as the eval section says (judge, judge_local_model)
            mcfg = dataclasses.replace(ecfg, limit=cfg.mt_bench_limit, output=str(root / "eval" / name))
            results.update(evaluate_tasks(model, tok, ["mt_bench"], mcfg, model_name=name,
                                          output_dir=root / "eval" / name))  # fmt: skip
        return results

    return cached_step(where, "results.json", step, compute)


def cached_step(where: Path, filename: str, step_config: dict, compute) -> dict:
    """A step's JSON result ``where/filename``, reused only when the step ran with this configuration and
    these input contents (the content fingerprint `ResultsWriter` uses, recorded in ``where/stage.json``, a name kept so that
    earlier runs stay reusable);
    computed when missing. A different configuration is refused in one line, as every command refuses to
    mix runs: change ``eval_limit`` and rerun, and the old numbers do not come back (issue 24 §2)."""
    from ctxaware.core.results import config_changes, run_record

    done, record = where / filename, where / "stage.json"
    if done.is_file() and record.is_file():
        old = json.loads(record.read_text())
        changed = config_changes(old.get("config", {}), old.get("inputs"), step_config)
        if changed:
            raise CtxawareError(
                f"{where} holds this step's results for another configuration (differs in: "
                f"{', '.join(changed)}); use another output_dir, or delete {where} to recompute it"
            )
        return json.loads(done.read_text())
    write_json_atomic(record, run_record(step_config))  # a run from before stages recorded it: recorded now
    if done.is_file():
        return json.loads(done.read_text())
    out = compute()
    if not done.is_file():  # commands that write their own summary (attention, stages) have written it
        write_json_atomic(done, out)
    return out


def step_nih(cfg: ExperimentConfig, root: Path, name: str, model_dir: str, indicator: bool) -> dict:
    """NIH (the ``nih`` section) under ``nih_conditions``: ``{condition: summary}`` (rows resume)."""
    from ctxaware.evaluation import nih

    configs = []
    for prefix in (True, False):
        modes = [m for c, (m, p) in NIH_CONDITIONS.items() if c in cfg.nih_conditions and p == prefix]
        if modes:
            where = root / "nih" / name / ("prefix" if prefix else "no_prefix")
            configs.append(dataclasses.replace(cfg.nih, modes=modes, indicator=[indicator], prefix=[prefix],
                                               chat_template=template_file(root, cfg), output=str(where),
                                               **model_options(cfg, model_dir)))  # fmt: skip

    def compute() -> dict:
        out: dict = {}
        for ncfg in configs:
            short, rows = nih.run_model(ncfg, model_dir)
            out.update(nih.report(Path(ncfg.output), short, rows))
        return out

    step = {"model": model_dir, "runs": [to_dict(c) for c in configs]}
    return cached_step(root / "nih" / name, "results.json", step, compute)


def step_attention(cfg: ExperimentConfig, root: Path, name: str, model_dir: str) -> dict:
    """Attention per role (the ``attention`` section; three normalisations, Fig. 3-4) on NIH prompts;
    ``attention/{name}/``."""
    from ctxaware.attention import allocation as attention

    where = root / "attention" / name
    acfg = dataclasses.replace(cfg.attention, chat_template=template_file(root, cfg), output=str(where),
                               **model_options(cfg, model_dir))  # fmt: skip
    return cached_step(
        where, "allocation.json", to_dict(acfg), lambda: attention.run_one(acfg, model_dir, where)
    )


def step_stage_analysis(cfg: ExperimentConfig, root: Path, chain: dict[str, str]) -> dict:
    """The stage analysis (the ``stages`` section, `ctxaware stages`) over base -> vanilla SFT -> DPO ->
    GRPO."""
    from ctxaware.evaluation.stages import run

    options = {k: v for k, v in model_options(cfg, "").items() if k != "model"}  # the chain names the models
    scfg = dataclasses.replace(cfg.stages, checkpoints=[f"{k}={v}" for k, v in chain.items()],
                               mode="zephyr" if cfg.train.chat_template == "zephyr" else "auto",
                               output=str(root / "stages"), **options)  # fmt: skip
    return cached_step(root / "stages", "summary.json", to_dict(scfg), lambda: run(scfg))


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
    for f in cfg.data_files:
        if not Path(f).is_file():
            raise CtxawareError(f"data file {f} does not exist; fix data_files")
    root = Path(cfg.output_dir)
    timer = _Timer(root)
    cfg = copy.copy(cfg)  # the caller's config stays as given; the combined data lives under output_dir
    cfg.data = timer("data", step_data, cfg, root)
    seed_model, seed_summary = timer("train vanilla (seed)", step_seed, cfg, root)
    scores = timer("score", step_score, cfg, root, seed_model)
    extra: dict = {"table3": step_table3(cfg, root, scores)}
    plan = {"vanilla": (str(cfg.data), False)}
    for beta in cfg.betas:
        plan[f"+indicator b={beta}"] = (str(step_select(cfg, root, scores, beta)), True)
    runs: dict[str, dict] = {}
    if cfg.eval_base:
        runs["base"] = {"slug": "base", "model_dir": cfg.model.model, "indicator": False, "train": {}}
    for name, (data, indicator) in plan.items():
        slug = name.replace("+", "ind_").replace(" b=", "_b").replace(" ", "_")
        summary = timer(f"train {slug}", step_train, cfg, root, slug, data, indicator)
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
        summary = timer(f"train {stage}", step_post_training, cfg, root, stage, start)
        runs[stage] = {"slug": stage, "model_dir": summary["model_dir"], "indicator": False, "train": summary}
        start = summary["model_dir"]
    for r in runs.values():
        slug, md, ind = r["slug"], r["model_dir"], r["indicator"]
        if slug == "base":  # the paper's base rows: no template; the training template's view beside it
            r["eval"] = timer("eval base (plain)", step_evaluate, cfg, root, slug, md, ind, "plain")
            r["eval_chat_template"] = timer("eval base (chat)", step_evaluate, cfg, root, slug, md, ind)
        else:
            r["eval"] = timer(f"eval {slug}", step_evaluate, cfg, root, slug, md, ind)
        if cfg.nih is not None:
            r["nih"] = timer(f"nih {slug}", step_nih, cfg, root, slug, md, ind)
        if cfg.attention is not None:
            r["attention"] = timer(f"attention {slug}", step_attention, cfg, root, slug, md)
    if cfg.stages is not None:
        chain = {k: runs[k]["model_dir"] for k in ("base", "vanilla", *cfg.post_stages) if k in runs}
        extra["stages"] = timer("stages", step_stage_analysis, cfg, root, chain)
    extra["timing"] = timer.times
    return compare(root, runs, extra)


HELP = (
    "The paper's experiment from one YAML: clean and combine the SFT data, train the vanilla SFT (the seed), "
    "score every turn with eq. (2), Table 3, mark [IND] turns, train the +indicator SFT (and DPO, GRPO), "
    "evaluate every checkpoint (QA, conflict, NIH, attention, MT-Bench) and compare them. Every step is "
    "cached under output_dir: rerun the same command to resume. docs/experiment/gemma.yaml (Gemma-3-270M, "
    "20-step LoRA runs, n=50 per task) took about 2 h 20 min on a 2-core CPU (docs/experiment.md)."
)


def print_help() -> int:
    """The experiment's own options, then its sections: each is the named command's config, set in YAML as
    a nested mapping or on the command line as --SECTION.OPTION."""
    from ctxaware.core.config import build_parser

    parser = build_parser(ExperimentConfig, "ctxaware experiment", HELP)
    text = parser.format_help()
    sections = {"model": "the options every command shares (ctxaware nih --help: --model ... --peft-adapter)",
                **{n: f"ctxaware {c} --help" for n, c in (("train", "train"), ("score", "score"), ("eval", "eval"),
                   ("nih", "nih"), ("attention", "attention"), ("stages", "stages"))},
                "dpo": "ctxaware train --help, and recipes/dpo_cpu.yaml", "grpo": "ctxaware train --help, and recipes/grpo_cpu.yaml"}  # fmt: skip
    lines = ["", "sections (YAML: SECTION: {OPTION: VALUE}; command line: --SECTION.OPTION VALUE; the options "
             "the experiment sets itself are refused):"]  # fmt: skip
    lines += [f"  {n:<10} {h}; set by the experiment: {', '.join(SET_BY_EXPERIMENT.get(n, ())) or '-'}"
              for n, h in sections.items()]  # fmt: skip
    print(text + "\n".join(lines))
    return 0
