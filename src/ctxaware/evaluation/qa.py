"""``ctxaware eval TASK...``: context-dependent QA, knowledge conflict and MT-Bench (paper Sec. 4.1.3, Table 4).

For every model (or ``checkpoint-*`` directory) x condition (chat template on/off, ``[IND]`` on/off) x task:
render the task's prompt with `chat.render`, generate greedily with `generate.generate` (100 new tokens,
App. A.3; by default cut as the authors' lm-eval tasks do, at the first ". " or EOS), score with `metrics`
(the paper's ``contains`` under the authors' per-task rule), write one JSONL row per example through
`results.ResultsWriter` (rerun = resume) and a Table-4-style summary (Markdown + JSON). docs/evaluate.md holds
the protocol table: every choice, its source and the option that changes it.

Plain mode (no chat template) ends the prompt with the response prefix ``Answer:``: without any prefix
SmolLM2-135M-Instruct emits EOS at once and every score would be zero.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

from ctxaware.attention import steering
from ctxaware.core.config import ModelConfig, default_data_dir, overwrite_option
from ctxaware.core.distributed import dist_info, launch_writer, run_units
from ctxaware.core.errors import CtxawareError
from ctxaware.core.provenance import model_about
from ctxaware.core.results import ResultsWriter, SkipCounter, write_json_atomic
from ctxaware.core.stats import fmt
from ctxaware.data.metrics import (
    METRICS_BY_KIND,
    aggregate,
    conflict_scores,
    first_sentence,
    qa_scores,
    truncate_at,
)
from ctxaware.data.tasks import (
    EMPTY_FIRST_GOLD,
    TASKS,
    Example,
    Task,
    canonical_task_name,
    get_task,
    load_examples,
    sample,
)
from ctxaware.rendering.chat import render, with_empty_system
from ctxaware.rendering.generate import continuation_logprobs, generate
from ctxaware.rendering.indicator import append_indicator
from ctxaware.rendering.server import BackendOptions

STOPS = (". ", ".\n", "? ", "?\n", "! ", "!\n")  # end of the first sentence (generation stops early)
AUTHORS_STOPS = (". ",)  # the authors' lm-eval tasks: generate_until [". "] (and EOS), 100 tokens
QA_CUTS = ("authors", "sentence")
# The version of the task readers and metrics (QuAC first question, `contains` rules, answer cut); rows
# written under an older protocol are not resumed into a newer one.
PROTOCOL_VERSION = "authors-3"


@dataclasses.dataclass
class EvalConfig(ModelConfig, BackendOptions):
    """Evaluate context awareness (SQuAD, QuAC, DROP), context reliance (counterfactual sets, NQ-Swap,
    MemoTrap) and instruction following (MT-Bench) with and without the chat template.

    Parameters:
        tasks: task names (see `ctxaware.data.tasks.TASKS`). ``model`` may list several models separated by
            commas, or be a directory of ``checkpoint-*`` subdirectories (a sweep, evaluated in order).
        modes: ``chat`` (the model's template) and/or ``plain`` (no template, ``plain_prefix`` starts the answer).
        indicator: append ``[IND]`` to every user prompt (paper Sec. 3.2; the "+ Indicator" rows of Table 4).
        prompt_style: ``paper`` (Tables 5-6) or ``simple`` ("{context} {question}", for UltraChat-tuned models).
        limit / seed: evaluate a seeded random sample of ``limit`` examples per task (smaller limits are subsets).
        judge: ``local`` (a local HF model, offline, not comparable to GPT-4) or ``http`` (``judge_url``).
    """

    tasks: list[str] = dataclasses.field(
        default_factory=list,
        metadata={"help": "tasks to run, any of: " + ", ".join(TASKS), "positional": True},
    )
    modes: list[str] = dataclasses.field(
        default_factory=lambda: ["chat", "plain"], metadata={"help": "chat and/or plain"}
    )
    indicator: bool = dataclasses.field(default=False, metadata={"help": "append [IND] to every prompt"})
    protocol: Literal["authors", "ctxaware"] = dataclasses.field(
        default="authors",
        metadata={
            "help": "authors (their lm-eval wrapper: empty system turn, prompt ends at the assistant marker, "
            "DROP 256 new tokens) or ctxaware (user turn alone, template's generation prompt; docs/evaluate.md)"
        },
    )
    prompt_style: Literal["paper", "simple"] = dataclasses.field(
        default="paper", metadata={"help": "paper (Tables 5-6) or simple"}
    )
    plain_prefix: str = dataclasses.field(
        default="Answer:", metadata={"help": "response prefix in plain mode"}
    )
    source: str = dataclasses.field(default="local", metadata={"help": "local (shared files) or hub"})
    data_dir: str | None = dataclasses.field(
        default=None, metadata={"help": "shared data dir (default ../shared/data)"}
    )
    limit: int | None = dataclasses.field(
        default=None, metadata={"min": 1, "help": "examples per task (seeded sample)"}
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "sampling seed"})
    max_new_tokens: int = dataclasses.field(
        default=100, metadata={"min": 1, "help": "new tokens for QA and conflict tasks (paper App. A.3: 100)"}
    )
    drop_max_new_tokens: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": "new tokens for DROP; none: authors 256 (their DROP task sets no max_gen_toks, so "
            "lm-eval's default applies), ctxaware --max-new-tokens"
        },
    )
    qa_cut: str = dataclasses.field(
        default="authors",
        metadata={
            "help": "where an answer ends: authors (lm-eval: text before the first '. ', or EOS) or "
            "sentence (end of the first complete sentence, also at ? and !)"
        },
    )
    mt_bench_max_new_tokens: int = dataclasses.field(
        default=512, metadata={"min": 1, "help": "new tokens per MT-Bench turn"}
    )
    batch_size: int = dataclasses.field(default=8, metadata={"min": 1, "help": "generation batch size"})
    judge: str = dataclasses.field(default="local", metadata={"help": "MT-Bench judge: local or http"})
    judge_url: str | None = dataclasses.field(default=None, metadata={"help": "OpenAI-compatible base URL"})
    judge_model: str = dataclasses.field(
        default="gpt-4", metadata={"help": "model name sent to the judge URL"}
    )
    judge_api_key_env: str = dataclasses.field(
        default="OPENAI_API_KEY", metadata={"help": "env var with the key"}
    )
    judge_local_model: str = dataclasses.field(default="default", metadata={"help": "local judge model spec"})
    judge_retries: int = dataclasses.field(
        default=3, metadata={"min": 0, "help": "judge retries (exponential back-off)"}
    )
    judge_timeout: float = dataclasses.field(
        default=60.0, metadata={"help": "seconds one judge request may take", "gt": 0}
    )
    steer: str | None = dataclasses.field(
        default=None, metadata={"path": "input", "help": "heads JSON {layer: [heads]} to steer"}
    )
    alpha: float = dataclasses.field(
        default=0.01, metadata={"help": "steering scale for non-user tokens", "gt": 0, "max": 1}
    )
    steer_generated: bool = steering.steer_generated_option()
    output: str = dataclasses.field(
        default="runs/eval", metadata={"path": "output_dir", "help": "output directory"}
    )
    overwrite: bool = overwrite_option()
    dump_prompts: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "write every prompt (task, id, mode, text, ids) to this JSONL and exit; tokenizer only",
            "path": "output_file",
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # every field's own rule (config.Checked)
        check_eval_options(self)


# --- models and conditions ---------------------------------------------------------------------------


def expand_models(spec: str) -> list[str]:
    """Comma-separated specs; a directory of ``checkpoint-*`` subdirectories expands to them by step."""
    out: list[str] = []
    for s in (x.strip() for x in spec.split(",") if x.strip()):
        p = Path(s)
        ckpts = (
            sorted(p.glob("checkpoint-*"), key=lambda c: int(re.sub(r"\D", "", c.name) or 0))
            if p.is_dir()
            else []
        )
        out += [str(c) for c in ckpts if c.is_dir()] if ckpts and not (p / "config.json").is_file() else [s]
    return out


LM_EVAL_MAX_GEN_TOKS = 256  # lm-eval's default when a task sets no max_gen_toks (the authors' DROP)


def max_new_tokens(cfg: EvalConfig, task: str) -> int:
    """New tokens for ``task``: ``drop_max_new_tokens`` for DROP (none: authors 256, ctxaware the common
    ``max_new_tokens``), else ``max_new_tokens`` (100, App. A.3 and the authors' SQuAD/QuAC tasks)."""
    if task == "drop":
        if cfg.drop_max_new_tokens is not None:
            return cfg.drop_max_new_tokens
        if cfg.protocol == "authors":
            return LM_EVAL_MAX_GEN_TOKS
    return cfg.max_new_tokens


def condition_name(mode: str, indicator: bool) -> str:
    return mode + ("+ind" if indicator else "")


# --- prompts and scoring -----------------------------------------------------------------------------


def build_prompt(
    task: Task,
    ex: Example,
    tok,
    mode: str,
    style: str,
    indicator: bool,
    plain_prefix: str | None,
    protocol: str = "authors",
):
    """The rendered prompt of one example: template, optional ``[IND]``, chat template or plain + prefix.

    Chat mode under ``protocol="authors"`` is the authors' lm-eval wrapper (``wrap_chat_template``): an
    empty system turn, the user turn and an empty assistant turn rendered without a generation prompt, the
    closing EOS/BOS text cut and the ends stripped (ChatML ends ``<|im_start|>assistant``); the data's
    context and question are not stripped. ``protocol="ctxaware"``: the user turn alone with the template's
    generation prompt (SmolLM2's template then injects its default system prompt)."""
    authors = protocol == "authors"
    content = task.prompt(ex, style, strip=not authors)
    if indicator:
        content = append_indicator(content)
    msgs = [{"role": "user", "content": content}]
    if mode == "chat":
        if authors:
            msgs = with_empty_system(msgs, tok) + [{"role": "assistant", "content": ""}]
            return render(msgs, tok, "chat", add_generation_prompt=False, trim_closing=True)
        return render(msgs, tok, "chat")
    if mode == "plain":
        return render(msgs, tok, "plain", response_prefix=plain_prefix or None)
    raise CtxawareError(f"mode {mode!r} is not one of chat, plain")


def score_example(task: Task, ex: Example, prediction: str, protocol: str = "authors") -> dict:
    """The task's metrics of one prediction, plus ``empty`` (the model answered nothing, e.g. EOS at once).

    DROP under ``protocol="authors"``: an example whose first gold is empty (hub data) scores ``contains``
    1 whatever the prediction, as the authors' empty regex matches every text."""
    if task.kind == "conflict":
        scores = conflict_scores(prediction, ex.answers, ex.memory_answers)
    else:
        scores = qa_scores(prediction, ex.answers, ex.spans, task.contains_rule)
        if protocol == "authors" and ex.category == EMPTY_FIRST_GOLD:
            scores["contains"] = 1.0
    return {**scores, "empty": float(not prediction.strip())}


def _row_base(task: Task, ex: Example, prompt_text: str) -> dict:
    return {
        "id": ex.id,
        "task": task.name,
        "prompt": prompt_text,
        "gold": ex.answers,
        **({"memory_answers": ex.memory_answers} if ex.memory_answers else {}),
        **({"category": ex.category} if ex.category else {}),
    }


def run_generative(
    model, tok, task, todo, writer, cfg, mode, batch_context, run: tuple | None = None
) -> None:
    """QA and conflict tasks: generate in chunks, score, write each chunk (so a killed run loses little).
    ``run`` = ``(directory, run config, about, server)``: the chunks are shared by the ranks of a launch and
    rank 0's ``writer`` receives every row in chunk order (`ctxaware.core.distributed.run_units`); a server
    (``--backend server``) generates instead of ``model``."""
    prefix = cfg.plain_prefix if mode == "plain" else None
    authors = cfg.qa_cut == "authors"
    chunk = max(1, cfg.batch_size)  # one batch per write: a killed run loses at most one batch
    server = run[3] if run is not None else None
    chunks = [todo[start : start + chunk] for start in range(0, len(todo), chunk)]

    def compute(i: int, w: ResultsWriter) -> None:
        part = chunks[i]
        prompts = [
            build_prompt(task, ex, tok, mode, cfg.prompt_style, cfg.indicator, prefix, cfg.protocol)
            for ex in part
        ]
        stop = AUTHORS_STOPS if authors else STOPS
        if server is not None:
            gens = server.generate(tok, prompts, max_new_tokens=max_new_tokens(cfg, task.name), stop=stop,
                                   desc=f"{task.name}/{mode} (server)")  # fmt: skip
        else:
            gens = generate(model, tok, prompts, max_new_tokens=max_new_tokens(cfg, task.name), stop=stop,
                            batch_size=cfg.batch_size, batch_context=batch_context, desc=f"{task.name}/{mode}")  # fmt: skip
        for ex, r, g in zip(part, prompts, gens):
            pred = truncate_at(g.text, AUTHORS_STOPS) if authors else first_sentence(g.text)
            w.write(
                {
                    **_row_base(task, ex, r.text),
                    "output": g.text,
                    "prediction": pred,
                    "stop_reason": g.stop_reason,
                    "scores": score_example(task, ex, pred, cfg.protocol),
                }
            )

    if run is None:  # called directly with a writer: one process
        for i in range(len(chunks)):
            compute(i, writer)
        return
    directory, run_config, about, _ = run
    cells = [[{"id": ex.id} for ex in c] for c in chunks]
    run_units(writer, directory, cells, compute, run_config, ("id",), about=about, kind="eval")


def run_choice(model, tok, task, todo, writer, cfg, mode) -> None:
    """MemoTrap: the class whose continuation has the highest summed log-probability is the answer."""
    for ex in todo:
        r = build_prompt(task, ex, tok, mode, cfg.prompt_style, cfg.indicator, None, cfg.protocol)
        conts = [tok(c, add_special_tokens=False)["input_ids"] for c in ex.classes]
        lps = continuation_logprobs(model, tok, [r.input_ids] * len(conts), conts, batch_size=cfg.batch_size)
        pick = max(range(len(lps)), key=lps.__getitem__)
        writer.write(
            {
                **_row_base(task, ex, r.text),
                "classes": ex.classes,
                "label": ex.label,
                "logprobs": lps,
                "prediction": ex.classes[pick],
                "scores": {"accuracy": float(pick == ex.label)},
            }
        )


# --- one condition -----------------------------------------------------------------------------------


def _run_config(cfg: EvalConfig, model_name: str, task: str, mode: str) -> dict:
    """What fingerprints a results directory (``limit`` excluded: a larger limit extends the sample)."""
    keys = (
        "revision",
        "dtype",
        "protocol",
        "drop_max_new_tokens",
        "prompt_style",
        "plain_prefix",
        "source",
        "seed",
        "max_new_tokens",
        "qa_cut",
        "mt_bench_max_new_tokens",
        "indicator",
        "steer",
        "alpha",
    )
    t = get_task(task)
    task_file = (
        str(Path(cfg.data_dir or default_data_dir()) / t.local_file)
        if cfg.source == "local" and t.local_file
        else None
    )  # hashed by ResultsWriter (docs/resume.md)
    return {
        "model": model_name,
        "task": task,
        "mode": mode,
        "task_file": task_file,
        "reader_version": PROTOCOL_VERSION,
        **{k: getattr(cfg, k) for k in keys},
        # PASTA's prompt-only steering (eq. 1 as stated is recorded as runs made before the option)
        **({"steer_generated": False} if cfg.steer is not None and not cfg.steer_generated else {}),
        # generated by a server: which one is part of what the rows are (how requests travel is not)
        **(
            {"backend": "server", "served_model": cfg.served_model or cfg.model}
            if cfg.backend == "server"
            else {}
        ),
    }


def check_eval_options(cfg: EvalConfig) -> None:
    """The evaluation options' rules that need more than one field or the task registry, checked when an
    `EvalConfig` is built (one-line errors); task names are resolved to their registry spelling
    (``mt-bench`` -> ``mt_bench``)."""
    if cfg.qa_cut not in QA_CUTS:
        raise CtxawareError(f"--qa-cut {cfg.qa_cut!r} is not one of {', '.join(QA_CUTS)}")
    for m in cfg.modes:
        if m not in ("chat", "plain"):
            raise CtxawareError(f"--modes: {m!r} is not one of chat, plain")
    cfg.tasks = [canonical_task_name(t) for t in cfg.tasks]  # unknown names fail before any model loads
    if cfg.backend == "server":
        cfg.server(cfg.model)  # the URL, before anything runs
        needs_model = [t for t in cfg.tasks if t == "mt_bench" or get_task(t).kind == "choice"]
        if cfg.steer is not None or needs_model:
            what = (
                "--steer"
                if cfg.steer is not None
                else f"task {needs_model[0]} (log-probabilities or the judge's model)"
            )
            raise CtxawareError(f"{what} needs the model in process; run it with --backend hf")
    if "mt_bench" in cfg.tasks and cfg.judge == "http":
        from ctxaware.evaluation.judge import check_judge_url

        if not cfg.judge_url:
            raise CtxawareError("--judge http needs --judge-url (an OpenAI-compatible base URL)")
        check_judge_url(cfg.judge_url)  # before any answer is generated


def evaluate_tasks(
    model,
    tok,
    task_names: list[str],
    cfg: EvalConfig | None = None,
    *,
    mode: str | None = None,
    model_name: str = "model",
    output_dir: str | Path | None = None,
    batch_context=None,
    judge=None,
) -> dict:
    """Evaluate ``model`` on ``task_names`` under one condition; returns ``{task: {metrics, n, skipped, ...}}``.

    The entry point for the training/experiment module: ``cfg`` carries limit, seed, prompt style, indicator
    (defaults: `EvalConfig`); ``mode`` defaults to ``cfg.modes[0]``; ``output_dir=None`` keeps rows in a
    temporary directory; ``batch_context`` goes straight to `generate.generate` (attention steering).
    """
    cfg = cfg or EvalConfig()
    task_names = [canonical_task_name(t) for t in task_names]
    mode = mode or cfg.modes[0]
    tmp = tempfile.TemporaryDirectory() if output_dir is None else nullcontext(str(output_dir))
    with tmp as out:
        return {
            name: _evaluate_task(
                model, tok, get_task(name), cfg, mode, model_name, Path(out), batch_context, judge
            )
            for name in task_names
        }


def _evaluate_task(model, tok, task, cfg, mode, model_name, out: Path, batch_context, judge) -> dict:
    skips, repaired = SkipCounter(), SkipCounter()
    examples = load_examples(task, cfg.source, cfg.data_dir, skips, repaired)
    examples = sample(examples, cfg.limit, cfg.seed)
    directory = out / task.name
    t0 = time.perf_counter()
    run_config = _run_config(cfg, model_name, task.name, mode)
    server = cfg.server(model_name)  # --backend server: the same prompts, generated by the server
    about = server.about() if server is not None else model_about(model, tok)
    rank, world = dist_info()
    if world > 1 and task.kind in ("choice", "mtbench"):
        raise CtxawareError(f"task {task.name} runs in one process; launch QA and conflict tasks only")
    run = (directory, run_config, about, server)
    writer, done = launch_writer(directory, run_config, ("id",), about=about, kind="eval")
    todo = [ex for ex in examples if not done({"id": ex.id})]
    if writer is None:  # another rank of a launch: its share of the QA chunks; rank 0 merges and summarises
        run_generative(model, tok, task, todo, None, cfg, mode, batch_context, run)
        return {"kind": task.kind, "rank": rank}
    with writer as w:
        judge_failed = 0
        if task.kind == "choice":
            run_choice(model, tok, task, todo, w, cfg, mode)
        elif task.kind == "mtbench":
            from ctxaware.evaluation.judge import run_mtbench

            judge_failed = run_mtbench(
                model, tok, todo, w, cfg, mode, batch_context, judge or make_judge(cfg)
            )
        else:
            run_generative(model, tok, task, todo, w, cfg, mode, batch_context, run)
        wanted = {ex.id for ex in examples}
        rows = [r for r in w.rows if r["id"] in wanted]
    result = {
        "kind": task.kind,
        "n": len(rows),
        "metrics": aggregate(rows, task.kind),
        "skipped": skips.as_dict(),
        "repaired": repaired.as_dict(),
        "resumed": len(examples) - len(todo),
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": str(directory / "rows.jsonl"),
    }
    if task.kind == "qa":  # rows where the paper's `contains` and `contains_strict` differ
        result["contains_disagreements"] = sum(
            r["scores"].get("contains") != r["scores"].get("contains_strict") for r in rows
        )
    if task.kind == "mtbench":
        result["judge"] = (rows[0].get("judge") if rows else None) or {}
        # examples whose judgment failed: not written, redone by the next run (judge.run_mtbench)
        result["judge_failures"] = judge_failed
    write_json_atomic(directory / "summary.json", result)
    return result


def make_judge(cfg: EvalConfig):
    from ctxaware.evaluation.judge import HTTPJudge, LocalJudge, check_judge_url

    if cfg.judge == "http":
        if not cfg.judge_url:
            raise CtxawareError("--judge http needs --judge-url (an OpenAI-compatible base URL)")
        return HTTPJudge(check_judge_url(cfg.judge_url), cfg.judge_model, cfg.judge_api_key_env,
                         timeout=cfg.judge_timeout, retries=cfg.judge_retries)  # fmt: skip
    if cfg.judge == "local":
        m, t = cfg.load(cfg.judge_local_model)
        return LocalJudge(m, t, name=cfg.judge_local_model)
    raise CtxawareError(f"--judge {cfg.judge!r} is not one of local, http")


# --- summary (paper Table 4 layout) ------------------------------------------------------------------

QA_COLUMNS = ("squad", "quac", "drop")


def _cell(res: dict, metric: str, pct: bool = True) -> str:
    s = res.get("metrics", {}).get(metric)
    return fmt(s, pct=pct) if s else "-"


def summary_markdown(results: dict) -> str:
    """``results[model][condition][task]`` -> a Table-4-style table (percent with 95% CI; MT-Bench as its
    1-10 rating) plus a details table."""
    tasks = list(dict.fromkeys(t for m in results.values() for c in m.values() for t in c))
    head, cols = ["Model", "Condition"], []
    for t in tasks:
        kind = next(c[t]["kind"] for m in results.values() for c in m.values() if t in c)
        if kind == "conflict":
            cols += [(t, "p_s", True), (t, "p_o", True)]
            head += [f"{t} p_s", f"{t} p_o"]
        else:
            metric = {"qa": "contains", "choice": "accuracy", "mtbench": "rating"}[kind]
            cols.append((t, metric, kind != "mtbench"))
            head.append(t + (" (judge, 1-10)" if kind == "mtbench" else ""))
    qa_in = [t for t in QA_COLUMNS if t in tasks]
    if qa_in:
        head.insert(2 + len([c for c in cols if c[0] in qa_in]), "QA avg.")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, conds in results.items():
        for cond, res in conds.items():
            cells = [_cell(res.get(t, {}), m, pct) for t, m, pct in cols]
            if qa_in:
                means = [res[t]["metrics"]["contains"]["mean"] for t in qa_in if t in res]
                cells.insert(len([c for c in cols if c[0] in qa_in]), f"{100 * sum(means) / len(means):.1f}")
            lines.append(f"| {model} | {cond} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + details_markdown(results)


def details_markdown(results: dict) -> str:
    lines = [
        "| Model | Condition | Task | n | skipped | metrics (mean [95% CI: exact Clopper-Pearson for proportions, "
        "bootstrap for F1 and ratings]; percent, ratings on 1-10) |",
        "|---|---|---|---|---|---|",
    ]
    for model, conds in results.items():
        for cond, res in conds.items():
            for t, r in res.items():
                ms = "; ".join(
                    f"{k} {fmt(v, pct=not k.startswith('rating'))}" for k, v in r["metrics"].items()
                )
                if r.get("kind") == "choice":  # not generated: the more likely continuation (log-likelihood)
                    ms += " (log-likelihood of the candidate continuations, not generation)"
                lines.append(f"| {model} | {cond} | {t} | {r['n']} | {_skipped(r['skipped'])} | {ms} |")
    return "\n".join(lines) + "\n"


def _skipped(skipped: dict) -> str:
    """``333 (333 unanswerable)``: the count with its reasons, on the line itself."""
    total, reasons = skipped.get("total", 0), skipped.get("by_reason") or {}
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda x: -x[1])) + ")"


def _reliance_plot(results: dict, out: Path) -> Path | None:
    from ctxaware.core.plotting import context_reliance_curve

    labels = list(results)
    series = {}
    for cond in dict.fromkeys(c for m in results.values() for c in m):
        for t in dict.fromkeys(t for m in results.values() for t in m.get(cond, {})):
            for metric in ("p_s", "p_o"):
                vals = [results[m].get(cond, {}).get(t, {}).get("metrics", {}).get(metric) for m in labels]
                if all(vals):
                    series[f"{t} {metric} ({cond})"] = [(v["mean"], v["ci_low"], v["ci_high"]) for v in vals]
    if not series:
        return None
    return context_reliance_curve([Path(m).name for m in labels], series, out / "context_reliance.png")


# --- CLI ---------------------------------------------------------------------------------------------


def _steering_context(model, cfg: EvalConfig):
    if not cfg.steer:
        return None
    heads = steering.steer_heads(cfg.steer, model)
    return steering.batch_context(model, heads, cfg.alpha, steer_generated=cfg.steer_generated)


def lm_eval_results(cfg: EvalConfig, results: dict) -> dict:
    """The run's numbers in lm-evaluation-harness's ``results.json`` shape (``results``, ``configs``,
    ``versions``, ``n-samples``, ``n-shot``, ``higher_is_better``, ``config``), so that tools built for lm-eval
    read them. Task names are ``ctxaware_{task}``, suffixed ``_{condition}`` when the run has several
    (chat / plain / +ind) or several models (``__{model}``); metrics are keyed ``{metric},none`` with
    ``{metric}_stderr,none`` (the standard error of the per-example values: sqrt(p(1-p)/n) for a
    proportion), as lm-eval writes them; ctxaware's own intervals stay in summary.json."""
    import math

    from ctxaware import __version__
    from ctxaware.core.models import run_id

    out = {
        "results": {},
        "configs": {},
        "versions": {},
        "n-samples": {},
        "n-shot": {},
        "higher_is_better": {},
    }
    several = len(results) > 1
    for spec, conds in results.items():
        for cond, tasks in conds.items():
            for task, r in tasks.items():
                if not isinstance(r, dict) or "metrics" not in r:
                    continue
                name = f"ctxaware_{task}" + (f"_{cond}" if len(conds) > 1 else "") + (
                    f"__{run_id(spec)}" if several else "")  # fmt: skip
                entry = {"alias": name}
                for metric, v in r["metrics"].items():
                    if not isinstance(v, dict) or v.get("mean") is None:
                        continue
                    n, m = v.get("n") or 0, v["mean"]
                    se = math.sqrt(m * (1 - m) / n) if n and 0 <= m <= 1 else None
                    entry[f"{metric},none"], entry[f"{metric}_stderr,none"] = m, se
                out["results"][name] = entry
                out["configs"][name] = {
                    "task": name, "output_type": "generate_until", "num_fewshot": 0,
                    "generation_kwargs": {"max_gen_toks": cfg.max_new_tokens, "do_sample": False},
                    "metric_list": [{"metric": k, "higher_is_better": k != "p_o"} for k in r["metrics"]],
                    "metadata": {"ctxaware_task": task, "condition": cond, "model": spec, "protocol": cfg.protocol},
                }  # fmt: skip
                out["versions"][name] = __version__
                out["n-samples"][name] = {
                    "original": r.get("n_available", r.get("n")),
                    "effective": r.get("n"),
                }
                out["n-shot"][name] = 0
                out["higher_is_better"][name] = {k: k != "p_o" for k in r["metrics"]}
    out["config"] = {"model": "ctxaware", "model_args": f"pretrained={cfg.model}", "batch_size": cfg.batch_size,
                     "limit": cfg.limit, "gen_kwargs": {"max_gen_toks": cfg.max_new_tokens}}  # fmt: skip
    return out


def dump_prompts(cfg: EvalConfig, path: str | Path) -> int:
    """``--dump-prompts``: one JSON line per (model, mode, task, example) with the rendered prompt's text and
    ids, from the tokenizer alone (no model load), in the order the evaluation would run them."""
    from ctxaware.core.models import canonical_spec
    from ctxaware.core.results import write_jsonl_atomic

    rows = []
    for spec in expand_models(cfg.model):
        tok = cfg.load_tokenizer(spec)
        for mode in cfg.modes:
            prefix = cfg.plain_prefix if mode == "plain" else None
            for name in cfg.tasks:
                task = get_task(name)
                if task.kind not in ("qa", "conflict", "choice"):
                    continue  # MT-Bench turns depend on the model's own first answer
                for ex in sample(load_examples(task, cfg.source, cfg.data_dir), cfg.limit, cfg.seed):
                    r = build_prompt(
                        task, ex, tok, mode, cfg.prompt_style, cfg.indicator, prefix, cfg.protocol
                    )
                    rows.append({"model": canonical_spec(spec), "task": task.name, "id": ex.id,
                                 "mode": condition_name(mode, cfg.indicator), "protocol": cfg.protocol,
                                 "prompt_text": r.text, "input_ids": r.input_ids})  # fmt: skip
    write_jsonl_atomic(Path(path), rows)
    return len(rows)


__all__ = ["EvalConfig", "evaluate_tasks", "METRICS_BY_KIND", "run_generative", "run_choice"]
