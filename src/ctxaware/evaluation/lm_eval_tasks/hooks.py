"""ctxaware's evaluations as lm-evaluation-harness tasks (issue 25 section 4): the functions its YAML files name.

lm-eval loads this file by path (``!function hooks.qa_dataset``), so every import here is absolute. The
prompts are rendered by ctxaware (`ctxaware.evaluation.qa.build_prompt`, `ctxaware.data.needle.build_prompts`)
for the tokenizer that lm-eval's ``--model_args`` name (``tokenizer=`` or ``pretrained=``; ``ctxaware_tokenizer``
in ``--metadata`` wins), and the scores are ctxaware's own (`ctxaware.evaluation.qa.score_example`,
`ctxaware.data.needle.keyword_recall`), imported, not copied. A task's ``metadata`` (``ctxaware_task``,
``mode``, ``prefix``) says which evaluation it is; ``--metadata '{...}'`` may set the prompt options listed
in ``QA_OPTIONS`` (QA, conflict) and any `NeedleConfig` field but ``NIH_SKIP`` (NIH), with ctxaware's names and rules (docs/lm_eval.md).
"""

from __future__ import annotations

import dataclasses
import json

from ctxaware.core.errors import CtxawareError

# --metadata keys that shape a QA / conflict prompt (ctxaware.evaluation.qa.EvalConfig fields). The generation
# settings are the YAML's (the authors' lm-eval tasks: 100 new tokens, 256 for DROP, stop at ". ").
QA_OPTIONS = ("indicator", "prompt_style", "plain_prefix", "seed", "source", "data_dir", "protocol")
# fields of ctxaware.data.needle.NeedleConfig that --metadata may set; modes and prefix come from the task
NIH_SKIP = ("modes", "prefix")
TOKENIZER_KEYS = ("ctxaware_tokenizer", "tokenizer", "pretrained", "model")


def _tokenizer(meta: dict):
    """The tokenizer the prompts are rendered for: the first of ``TOKENIZER_KEYS`` in lm-eval's metadata
    (its ``--model_args`` and ``--metadata``), loaded by ctxaware's one loader (built-in names, .gguf, a
    directory or a hub id; ``revision`` and ``trust_remote_code`` as given there, the latter off by default)."""
    from ctxaware.core.models import load_tokenizer

    spec = next((meta[k] for k in TOKENIZER_KEYS if isinstance(meta.get(k), str) and meta[k]), None)
    if spec is None:
        raise CtxawareError(
            "ctxaware's lm-eval tasks render their prompts with the model's tokenizer: pass it in --model_args "
            '(pretrained=... or tokenizer=...) or as --metadata \'{"ctxaware_tokenizer": "..."}\''
        )
    trust = meta.get("trust_remote_code", False)
    trust = trust if isinstance(trust, bool) else str(trust).lower() == "true"
    return spec, load_tokenizer(spec, revision=meta.get("revision"), trust_remote_code=trust)


def _dataset(docs: list[dict]) -> dict:
    import datasets

    return {"test": datasets.Dataset.from_list(docs)}


# --- QA and knowledge conflict (ctxaware eval) -------------------------------------------------------------


def qa_config(meta: dict):
    """The `EvalConfig` of one lm-eval task: its ``ctxaware_task`` and ``mode``, plus the ``QA_OPTIONS`` given."""
    from ctxaware.evaluation.qa import EvalConfig

    if meta.get("protocol", "authors") != "authors":
        raise CtxawareError(
            "ctxaware's lm-eval tasks follow the authors' protocol (their lm-eval tasks' generation settings); "
            "run `ctxaware eval --protocol ctxaware` for the other"
        )
    opts = {k: meta[k] for k in QA_OPTIONS if k in meta}
    return EvalConfig(tasks=[meta["ctxaware_task"]], modes=[meta.get("mode", "chat")], **opts)


def qa_dataset(**meta) -> dict:
    """Every example of the task, in the seeded order of ``ctxaware eval --seed`` (lm-eval's ``--limit N``
    takes the same N examples as ``ctxaware eval --limit N``), each with its rendered prompt."""
    from ctxaware.data.tasks import get_task, load_examples, shuffled
    from ctxaware.evaluation.qa import build_prompt

    cfg = qa_config(meta)
    task = get_task(cfg.tasks[0])
    if task.kind not in ("qa", "conflict"):
        raise CtxawareError(
            f"{task.name} is a {task.kind} task; the lm-eval pack has the QA and conflict tasks"
        )
    _, tok = _tokenizer(meta)
    mode = cfg.modes[0]
    prefix = cfg.plain_prefix if mode == "plain" else None
    docs = []
    for ex in shuffled(load_examples(task, cfg.source, cfg.data_dir), cfg.seed):
        r = build_prompt(task, ex, tok, mode, cfg.prompt_style, cfg.indicator, prefix, cfg.protocol)
        docs.append({"id": ex.id, "task": task.name, "prompt": r.text, "gold": " | ".join(ex.answers),
                     "example": json.dumps(dataclasses.asdict(ex))})  # fmt: skip
    return _dataset(docs)


def qa_process_results(doc: dict, results: list[str]) -> dict:
    """ctxaware's scores of one answer: lm-eval has cut it at the task's stop (``". "``, the authors'), and
    `ctxaware.evaluation.qa.score_example` scores it as ``ctxaware eval`` does."""
    from ctxaware.data.metrics import METRICS_BY_KIND, truncate_at
    from ctxaware.data.tasks import Example, get_task
    from ctxaware.evaluation.qa import AUTHORS_STOPS, score_example

    task = get_task(doc["task"])
    scores = score_example(
        task, Example(**json.loads(doc["example"])), truncate_at(results[0], AUTHORS_STOPS)
    )
    out = {k: scores[k] for k in METRICS_BY_KIND[task.kind] if k in scores}  # DROP alone has drop_em/_f1
    if task.kind == "conflict":
        out["memorization_ratio"] = (scores["p_o"], scores["p_s"])
    return out


def memorization_ratio(items: list) -> float:
    """mean(p_o) / (mean(p_o) + mean(p_s)) over the examples (`ctxaware.data.metrics.memorization_ratio`)."""
    from ctxaware.data.metrics import memorization_ratio as ratio

    return ratio([o for o, _ in items], [s for _, s in items], n_resamples=1)["mean"]


# --- needle in a haystack (ctxaware nih) -------------------------------------------------------------------


def nih_config(meta: dict):
    """The `NeedleConfig` of one lm-eval NIH task: its ``mode`` and ``prefix``, plus the NeedleConfig fields
    given in ``--metadata`` (``lengths``, ``depths``, ``n_lengths``, ``max_length``, ``protocol``, ...)."""
    from ctxaware.data.needle import NeedleConfig

    fields = {f.name for f in dataclasses.fields(NeedleConfig)} - set(NIH_SKIP)
    opts = {k: meta[k] for k in fields if k in meta}
    if isinstance(opts.get("indicator"), bool):
        opts["indicator"] = [opts["indicator"]]
    return NeedleConfig(modes=[meta.get("mode", "chat")], prefix=[bool(meta.get("prefix", True))], **opts)


def nih_dataset(**meta) -> dict:
    """Every test of the NIH grid for this tokenizer, in ``ctxaware nih``'s order (length, then depth), each
    with its rendered prompt (the response prefix included) and the keywords it is scored on."""
    from ctxaware.core.models import run_id
    from ctxaware.data.needle import apply_chat_template_choice, build_prompts, load_needle

    cfg = nih_config(meta)
    spec, tok = _tokenizer(meta)
    apply_chat_template_choice(tok, cfg.chat_template)
    needle, _, keywords, _ = load_needle(cfg)
    docs = []
    for p in build_prompts(cfg, tok, run_id(spec)):
        c = p.cell
        docs.append({
            "prompt": p.render(tok).text, "condition": c["condition"], "template": c["template"],
            "length": c["length"], "depth": c["depth"], "context_tokens": c["context_tokens"],
            "keywords": json.dumps(keywords), "gold": needle,
        })  # fmt: skip
    return _dataset(docs)


def nih_process_results(doc: dict, results: list[str]) -> dict:
    """``recall`` (the paper's keyword recall), ``exact`` (every keyword) and ``empty``, as ``ctxaware nih``."""
    from ctxaware.data.needle import keyword_recall

    rec = keyword_recall(results[0], json.loads(doc["keywords"]))
    return {"recall": rec, "exact": float(rec == 1.0), "empty": float(not results[0].strip())}
