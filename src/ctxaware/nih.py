"""Needle in a haystack, with and without the chat template (paper Sec. 2.1, App. A.2, Tables 7-8, Fig. 2).

A needle sentence is inserted at depth d% of a haystack cut to a target length; the model is asked a
question whose answer is the needle; the score is keyword recall. The grid is lengths x depths (the
paper: 20 x 20 = 400 tests). Conditions are compared on the *same* context: chat template on/off,
response prefix on/off (the assistant turn starts with the needle's first words, as in the paper's
Fig. 2), indicator on/off (``[IND]`` after the question, paper Sec. 3.2).

One cell's context is shared by all its conditions, so that their prompts differ only in template tokens;
it is sized so that the longest condition's whole prompt fits the target length.

    ctxaware nih --lengths 200,1000 --depths 0,50,100
    ctxaware nih --model smollm2-135m-instruct,gemma3-270m --n-lengths 10 --n-depths 10 --max-length 2000
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import string
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import yaml

from ctxaware import plotting, stats, steering
from ctxaware.chat import Rendered, render
from ctxaware.config import ModelConfig, parse_config, to_dict
from ctxaware.errors import CtxawareError
from ctxaware.generate import generate
from ctxaware.indicator import append_indicator
from ctxaware.results import ResultsWriter, write_json_atomic

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
PG_ESSAYS = REPO.parent / "shared" / "data" / "haystack" / "paul_graham_essays"

# Paper Table 8, verbatim.
TEMPLATES = (
    "You are a helpful AI assistant that answers a question using only the provided document: {context} "
    "Question: {retrieval_question}",
    "You are a helpful AI assistant that answers a question using only the provided context: {context} "
    "Question: {retrieval_question}",
    "Document: {context} Answer the question according to the provided document: {retrieval_question}",
    "Context: {context} Answer the question according to the provided context: {retrieval_question}",
)


@dataclasses.dataclass
class NIHConfig(ModelConfig):
    """Needle-in-a-haystack with and without the chat template (paper Sec. 2.1, App. A.2).

    Parameters (haystack and needle):
        haystack: ``auto`` (the Paul Graham essays in ``../shared/data`` when present, else synthetic),
            ``synthetic`` (built-in neutral filler) or a directory of ``.txt`` files.
        needle, question, keywords: the fact, the question that retrieves it and the words scored.
        response_prefix: text that opens the answer in ``prefix`` conditions (``none``: the needle's first
            ``prefix_words`` words).
        needle_file: YAML/JSON file with any of needle, question, keywords, response_prefix (overrides).
    Parameters (grid and conditions):
        lengths / depths: explicit grid; empty: ``n_lengths`` lengths uniform in [200, max_length] and
            ``n_depths`` depths uniform in [0, 100] (paper: 20 x 20).
        template: 1-4 (paper Table 8) or ``all`` (mean +- std over the four, like Table 7).
        modes x prefix x indicator: the conditions, all run side by side.
    Parameters (run): max_new_tokens (paper: 50), batch_size, prefix_cache, output.
    """

    haystack: str = dataclasses.field(
        default="auto", metadata={"help": "auto, synthetic or a directory of .txt"}
    )
    needle: str = dataclasses.field(
        default="The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
        metadata={"help": "the sentence hidden in the haystack"},
    )
    question: str = dataclasses.field(
        default="What is the best thing to do in San Francisco?", metadata={"help": "the retrieval question"}
    )
    keywords: list[str] = dataclasses.field(
        default_factory=lambda: ["eat", "sandwich", "sit", "dolores", "park", "sunny", "day"],
        metadata={"help": "words whose presence in the output is scored (recall)"},
    )
    response_prefix: str | None = dataclasses.field(
        default=None, metadata={"help": "answer opener; none: from needle"}
    )
    prefix_words: int = dataclasses.field(
        default=9, metadata={"help": "needle words in the default response prefix"}
    )
    needle_file: str | None = dataclasses.field(
        default=None, metadata={"help": "YAML/JSON with needle/question/keywords"}
    )
    lengths: list[int] = dataclasses.field(
        default_factory=list, metadata={"help": "prompt lengths in tokens"}
    )
    depths: list[float] = dataclasses.field(
        default_factory=list, metadata={"help": "needle depths in percent"}
    )
    n_lengths: int = dataclasses.field(default=20, metadata={"help": "lengths when --lengths is empty"})
    n_depths: int = dataclasses.field(default=20, metadata={"help": "depths when --depths is empty"})
    max_length: int | None = dataclasses.field(
        default=None, metadata={"help": "largest length; none: model window"}
    )
    template: str = dataclasses.field(
        default="1", metadata={"help": "prompt template 1-4 (paper Table 8) or all"}
    )
    modes: list[str] = dataclasses.field(
        default_factory=lambda: ["chat", "plain"], metadata={"help": "chat, plain"}
    )
    prefix: list[bool] = dataclasses.field(
        default_factory=lambda: [True, False], metadata={"help": "response prefix on/off"}
    )
    indicator: list[bool] = dataclasses.field(
        default_factory=lambda: [False], metadata={"help": "[IND] on/off"}
    )
    system: str | None = dataclasses.field(
        default=None, metadata={"help": "system message (none: template default)"}
    )
    max_new_tokens: int = dataclasses.field(
        default=50, metadata={"help": "greedy tokens per answer (paper: 50)"}
    )
    batch_size: int = dataclasses.field(default=8, metadata={"help": "prompts per generation batch"})
    prefix_cache: bool = dataclasses.field(
        default=True, metadata={"help": "reuse the KV cache of shared prefixes"}
    )
    output: str = dataclasses.field(default="runs/nih", metadata={"help": "results directory"})
    steer: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "steer heads (paper eq. 1): a heads JSON {layer: [heads]} from `ctxaware heads`, or all"
        },
    )
    alpha: list[float] = dataclasses.field(
        default_factory=lambda: [0.01, 0.1, 0.3, 0.5, 0.7, 0.9],
        metadata={"help": "steering alphas (with --steer); the best is reported as in the paper's Table 1"},
    )


class Condition(NamedTuple):
    mode: str
    prefix: bool
    indicator: bool

    @property
    def name(self) -> str:
        return self.mode + ("+prefix" if self.prefix else "") + ("+ind" if self.indicator else "")


class NIHPrompt(NamedTuple):
    """One test: ``cell`` (model-independent metadata), the ``messages`` and the ``response_prefix``."""

    cell: dict
    messages: list[dict]
    response_prefix: str | None

    def render(self, tok) -> Rendered:
        return render(self.messages, tok, self.cell["mode"], response_prefix=self.response_prefix)


# ---------------------------------------------------------------- haystack, needle, metric


def synthetic_haystack(n_sentences: int = 3000, seed: int = 0) -> str:
    """Neutral filler sentences (about 12 tokens each) that the project writes itself."""
    rng = random.Random(seed)
    subj = (
        "The committee|A small team|The old library|Most visitors|The river|A local farmer|The museum".split(
            "|"
        )
    )
    verb = "reviewed|described|repaired|noticed|measured|painted|collected|planned|visited|recorded".split(
        "|"
    )
    obj = (
        "the wooden bridge|a list of old maps|the morning schedule|several stone walls|the annual report|"
        "a box of letters|the northern road|two empty barns|the weather notes|a row of lamps"
    ).split("|")
    tail = (
        "before noon|after the rain|during the week|in early autumn|at a steady pace|near the old mill".split(
            "|"
        )
    )
    return " ".join(
        f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)} {rng.choice(tail)}."
        for _ in range(n_sentences)
    )


def load_haystack(spec: str) -> tuple[str, str]:
    """``(text, description)``: ``.txt`` files of a directory in sorted order, whitespace collapsed."""
    if spec == "synthetic" or (spec == "auto" and not PG_ESSAYS.is_dir()):
        return synthetic_haystack(), "synthetic"
    d = PG_ESSAYS if spec == "auto" else Path(spec).expanduser()
    if not d.is_dir():
        raise CtxawareError(
            f"haystack {spec!r} is not a directory; give a directory of .txt files, or 'synthetic'"
        )
    texts = [p.read_text(errors="replace") for p in sorted(d.glob("*.txt"))]
    text = re.sub(r"\s+", " ", " ".join(texts)).strip()
    if not text:
        raise CtxawareError(
            f"haystack directory {d} holds no text (.txt files); add some, or use --haystack synthetic"
        )
    return text, str(d)


def load_needle(cfg: NIHConfig) -> tuple[str, str, list[str], str]:
    """``(needle, question, keywords, response_prefix)`` from the config and the optional needle file."""
    over: dict = {}
    if cfg.needle_file:
        p = Path(cfg.needle_file)
        if not p.is_file():
            raise CtxawareError(f"needle file {p} does not exist; give a YAML or JSON file")
        try:
            over = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise CtxawareError(f"needle file {p} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
        if not isinstance(over, dict) or set(over) - {"needle", "question", "keywords", "response_prefix"}:
            raise CtxawareError(
                f"needle file {p} must be a mapping with needle, question, keywords, response_prefix"
            )
    needle = str(over.get("needle", cfg.needle)).strip()
    question = str(over.get("question", cfg.question)).strip()
    keywords = over.get("keywords", cfg.keywords)
    if isinstance(keywords, str):
        keywords = keywords.split(",")
    keywords = [k for k in (normalize(str(k)).strip() for k in keywords or []) if k]
    if not needle or not question:
        raise CtxawareError("the needle and the question must not be empty")
    if not keywords:
        raise CtxawareError(
            "the keyword list is empty; give the words of the needle that an answer must contain"
        )
    prefix = over.get("response_prefix", cfg.response_prefix)
    if prefix is None:
        prefix = " ".join(needle.split()[: cfg.prefix_words])
    return needle, question, keywords, str(prefix)


def normalize(text: str) -> str:
    """Lower-case and strip punctuation (the paper's "subword match" normalisation)."""
    return text.lower().translate(str.maketrans("", "", string.punctuation))


def keyword_recall(output: str, keywords: list[str]) -> float:
    """Fraction of ``keywords`` found as whole words in ``output`` (paper Sec. 2.1; its error is 1 - this)."""
    words = set(normalize(output).split())
    return sum(normalize(k) in words for k in keywords) / len(keywords)


# ---------------------------------------------------------------- grid and prompts


def grid(cfg: NIHConfig, window: int) -> tuple[list[int], list[float]]:
    """The lengths and depths (paper App. A.2: 20 x 20, lengths uniform in [200, window])."""
    top = cfg.max_length or window
    lengths = cfg.lengths or [int(round(x)) for x in np.linspace(200, top, cfg.n_lengths)]
    depths = cfg.depths or [round(float(x), 2) for x in np.linspace(0, 100, cfg.n_depths)]
    if any(d < 0 or d > 100 for d in depths):
        raise CtxawareError(f"depths must lie in [0, 100] percent, got {depths}")
    if any(n < 1 for n in lengths):
        raise CtxawareError(f"lengths must be positive token counts, got {lengths}")
    if max(lengths) > window:
        raise CtxawareError(
            f"length {max(lengths)} exceeds the model's window of {window} tokens; lower --lengths/--max-length"
        )
    return sorted(set(lengths)), sorted(set(depths))


def conditions(cfg: NIHConfig, has_template: bool, model_name: str) -> list[Condition]:
    """The cross product modes x prefix x indicator; chat is skipped (with a note) for base models."""
    for m in cfg.modes:
        if m not in ("chat", "plain"):
            raise CtxawareError(f"mode {m!r} is not one of chat, plain")
    conds = [Condition(m, p, i) for m in cfg.modes for p in cfg.prefix for i in cfg.indicator]
    if not has_template:
        kept = [c for c in conds if c.mode == "plain"]
        if not kept:
            raise CtxawareError(
                f"{model_name} has no chat template, so only plain conditions can run; add --modes plain"
            )
        if len(kept) < len(conds):
            logger.warning("%s has no chat template: running only the plain conditions", model_name)
            print(f"note: {model_name} has no chat template; chat conditions skipped")
        conds = kept
    return conds


def templates(cfg: NIHConfig) -> list[int]:
    if cfg.template == "all":
        return [1, 2, 3, 4]
    if cfg.template not in ("1", "2", "3", "4"):
        raise CtxawareError(f"template {cfg.template!r} is not one of 1, 2, 3, 4, all (paper Table 8)")
    return [int(cfg.template)]


class Haystack:
    """The haystack tokenized once per tokenizer, with the token indices that start a sentence."""

    def __init__(self, text: str, tok, max_tokens: int) -> None:
        text = text[: max_tokens * 12]  # plenty of characters for max_tokens tokens
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        self.text, self.offsets = text, enc["offset_mapping"]
        if len(self.offsets) < max_tokens:
            raise CtxawareError(
                f"the haystack has only {len(self.offsets)} tokens, fewer than the {max_tokens} needed"
            )
        self.starts = [
            k for k in range(len(self.offsets)) if k == 0 or text[: self.offsets[k][0]].rstrip()[-1:] in ".!?"
        ]

    def boundary(self, k: int) -> int:
        """The last sentence start at or before token ``k``."""
        import bisect

        return self.starts[bisect.bisect_right(self.starts, k) - 1]

    def context(self, n_tokens: int, depth: float, needle: str) -> tuple[str, int]:
        """The first ``n_tokens`` haystack tokens with the needle at depth% (moved back to a sentence start)."""
        if n_tokens == 0:
            return needle, 0
        k = self.boundary(int(depth / 100 * n_tokens))
        end = self.offsets[n_tokens - 1][1]
        cut = self.offsets[k][0] if k < n_tokens else end
        before, after = self.text[:cut].strip(), self.text[cut:end].strip()
        return " ".join(p for p in (before, needle, after) if p), k


def _messages(cfg: NIHConfig, template: int, context: str, question: str, indicator: bool) -> list[dict]:
    q = append_indicator(question) if indicator else question
    msgs = [{"role": "system", "content": cfg.system}] if cfg.system is not None else []
    return msgs + [
        {"role": "user", "content": TEMPLATES[template - 1].format(context=context, retrieval_question=q)}
    ]


def fit_context(
    cfg: NIHConfig,
    tok,
    hay: Haystack,
    needle: str,
    question: str,
    prefix: str,
    longest: Condition,
    template: int,
    length: int,
    depth: float,
) -> tuple[str, int, int]:
    """``(context, needle_token_in_haystack, haystack_tokens)`` such that ``longest``'s prompt fits ``length``."""

    def size(n: int) -> tuple[int, str, int]:
        ctx, k = hay.context(n, depth, needle)
        msgs = _messages(cfg, template, ctx, question, longest.indicator)
        return (
            len(render(msgs, tok, longest.mode, response_prefix=prefix if longest.prefix else None)),
            ctx,
            k,
        )

    base = size(0)[0]
    if base > length:
        raise CtxawareError(
            f"needle, question and template alone take {base} tokens, more than the length {length}; "
            "use larger --lengths or a shorter needle"
        )
    n, best = length - base, None
    for _ in range(6):  # re-tokenisation at the joins can move the count by a token or two
        total, ctx, k = size(n)
        if total <= length and (best is None or n > best[2]):
            best = (ctx, k, n)
        if total == length:
            break
        n = max(0, n + length - total)
    assert best is not None
    return best


def build_prompts(
    cfg: NIHConfig, tok, model_name: str = "model", window: int | None = None
) -> list[NIHPrompt]:
    """Every NIH test of ``cfg`` for this tokenizer: ``(cell, messages, response_prefix)`` per test.

    The attention module reuses this to run the very same prompts. ``cell`` holds model, condition,
    mode, prefix, indicator, template, length, depth, haystack tokens and the needle's actual depth.
    """
    needle, question, _, prefix = load_needle(cfg)
    if window is None:
        window = int(getattr(tok, "model_max_length", 0) or 0)
        window = window if 0 < window < 10**7 else 10**6
    lengths, depths = grid(cfg, window)
    conds = conditions(cfg, bool(getattr(tok, "chat_template", None)), model_name)
    text, _ = load_haystack(cfg.haystack)
    hay = Haystack(text, tok, max(lengths))
    longest = max(conds, key=lambda c: (c.mode == "chat", c.prefix, c.indicator))
    out = []
    for t in templates(cfg):
        for length in lengths:
            for depth in depths:
                ctx, k, n = fit_context(cfg, tok, hay, needle, question, prefix, longest, t, length, depth)
                for c in conds:
                    cell = {
                        "model": model_name,
                        "condition": c.name,
                        "mode": c.mode,
                        "prefix": c.prefix,
                        "indicator": c.indicator,
                        "template": t,
                        "length": length,
                        "depth": depth,
                        "haystack_tokens": n,
                        "needle_depth": round(100 * k / max(1, n), 2),
                    }
                    msgs = _messages(cfg, t, ctx, question, c.indicator)
                    out.append(NIHPrompt(cell, msgs, prefix if c.prefix else None))
    return out


def needle_position(r: Rendered, tok, needle: str) -> int:
    """Token index in ``r`` where the needle starts (from character offsets)."""
    at = r.text.find(needle)
    enc = tok(r.text, add_special_tokens=r.mode == "plain", return_offsets_mapping=True)
    assert enc["input_ids"] == r.input_ids, "re-tokenisation differs from render()"
    return next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > at and b > a)


# ---------------------------------------------------------------- run, summarise, plot


def _fingerprinted(cfg: NIHConfig, model: str) -> dict:
    """The options that change results (batching and prefix reuse do not), for `ResultsWriter`."""
    d = to_dict(cfg)
    for k in ("model", "output", "batch_size", "prefix_cache"):
        d.pop(k)
    if d["steer"] is None:  # unsteered runs keep the fingerprint they had before steering existed
        d.pop("steer"), d.pop("alpha")
    return {**d, "model": model}


def steered_prompts(cfg: NIHConfig, prompts: list) -> list[tuple[float, object]]:
    """With ``--steer``: every chat-template test again once per alpha, as condition ``<name>+steer<alpha>``."""
    if cfg.steer is None:
        return []
    for a in cfg.alpha:
        if not 0 < a <= 1:
            raise CtxawareError(f"--alpha {a} must satisfy 0 < alpha <= 1 (eq. 1 down-weights non-user keys)")
    out = []
    for a in cfg.alpha:
        for p in prompts:
            if p.cell["condition"].startswith("chat"):
                cell = {**p.cell, "condition": f"{p.cell['condition']}+steer{a:g}"}
                out.append((a, p._replace(cell=cell)))
    return out


def run_model(cfg: NIHConfig, name: str) -> tuple[str, list[dict]]:
    """Run (or resume) every test for one model; rows go to ``output/<model>/rows.jsonl`` as they finish."""
    needle, _, keywords, _ = load_needle(cfg)
    model, tok = cfg.load(name)
    short = model.name_or_path
    window = int(
        getattr(model.config, "max_position_embeddings", 0) or getattr(tok, "model_max_length", 10**6)
    )
    prompts = build_prompts(cfg, tok, short, window)
    steered = steered_prompts(cfg, prompts)
    alpha_of = {id(p): a for a, p in steered}
    prompts = prompts + [p for _, p in steered]
    writer = ResultsWriter(
        Path(cfg.output) / short, _fingerprinted(cfg, name), ("condition", "template", "length", "depth")
    )
    todo = [p for p in prompts if not writer.done(p.cell)]
    print(f"{short}: {len(prompts)} tests, {len(prompts) - len(todo)} done before, {len(todo)} to run")
    rendered = [p.render(tok) for p in todo]

    def write(idx: list[int], gens, part: list[int]) -> None:
        for j, g in zip(idx, gens):
            i = part[j]
            r, rec = rendered[i], keyword_recall(g.text, keywords)
            row = {
                **todo[i].cell,
                "n_prompt_tokens": len(r),
                "needle_token_pos": needle_position(r, tok, needle),
            }
            row.update(output=g.text, stop_reason=g.stop_reason, recall=rec, exact=float(rec == 1.0))
            writer.write({**row, "empty": float(not g.text.strip())})

    heads = _steering_heads(cfg, model)
    t0 = time.time()
    with writer:  # one engine call per length and alpha: a killed run leaves conditions equally far along
        for length in sorted({p.cell["length"] for p in todo}):
            for alpha in dict.fromkeys(alpha_of.get(id(p)) for p in todo):
                part = [
                    i
                    for i, p in enumerate(todo)
                    if p.cell["length"] == length and alpha_of.get(id(p)) == alpha
                ]
                if not part:
                    continue
                generate(
                    model,
                    tok,
                    [rendered[i] for i in part],
                    max_new_tokens=cfg.max_new_tokens,
                    batch_size=cfg.batch_size,
                    prefix_cache=cfg.prefix_cache,
                    batch_context=None if alpha is None else steering.batch_context(model, heads, alpha),
                    desc=f"nih {short} {length}" + ("" if alpha is None else f" alpha={alpha:g}"),
                    callback=lambda idx, gens, part=part: write(idx, gens, part),
                )
    print(f"{short}: {len(todo)} tests in {time.time() - t0:.0f}s")
    return short, writer.rows


def _steering_heads(cfg: NIHConfig, model):
    """The heads of ``--steer``: ``all`` or a heads JSON (`retrieval_heads.load_heads` validates them)."""
    if cfg.steer is None:
        return None
    from ctxaware.retrieval_heads import load_heads

    return "all" if cfg.steer == "all" else load_heads(cfg.steer, model)


def steering_table(summaries: dict) -> str:
    """The paper's Table 1 from the summaries: baseline (template), best steered alpha, without template."""
    rows = {}
    for model, conds in summaries.items():
        steered = {c: s["recall"]["mean"] for c, s in conds.items() if "+steer" in c}
        if not steered:
            continue
        base_name = next(iter(steered)).split("+steer")[0]
        by_alpha = {
            float(c.split("+steer")[1]): v for c, v in steered.items() if c.startswith(base_name + "+")
        }
        best = max(by_alpha, key=lambda a: (by_alpha[a], a))
        plain = (
            conds.get(base_name.replace("chat", "plain", 1), {}).get("recall", {}).get("mean", float("nan"))
        )
        rows[f"{model} ({base_name})"] = {
            "baseline": conds[base_name]["recall"]["mean"] if base_name in conds else float("nan"),
            "steered": by_alpha[best],
            "best_alpha": best,
            "no_template": plain,
        }
    return steering.table(rows) if rows else ""


def summarize(rows: list[dict]) -> dict:
    """Recall, recall error, exact match (95% bootstrap CIs), empty-output rate, per-template means (Table 7)."""
    recall = [r["recall"] for r in rows]
    s = {
        "recall": stats.summarize(recall),
        "exact": stats.summarize([r["exact"] for r in rows]),
        "empty_rate": float(np.mean([r["empty"] for r in rows])),
        "n": len(rows),
    }
    rc = s["recall"]
    s["recall_error"] = {
        "mean": 1 - rc["mean"],
        "ci_low": 1 - rc["ci_high"],
        "ci_high": 1 - rc["ci_low"],
        "n": rc["n"],
    }
    per_t = {
        t: float(np.mean([r["recall"] for r in rows if r["template"] == t]))
        for t in sorted({r["template"] for r in rows})
    }
    s["per_template"] = per_t
    s["template_mean"], s["template_std"] = (
        float(np.mean(list(per_t.values()))),
        float(np.std(list(per_t.values()))),
    )
    return s


def report(out: Path, model: str, rows: list[dict]) -> dict[str, dict]:
    """Per condition: ``summary.json`` and a depth x length heatmap; returns the summaries."""
    result = {}
    for cond in dict.fromkeys(r["condition"] for r in rows):
        rs = [r for r in rows if r["condition"] == cond]
        lengths, depths = sorted({r["length"] for r in rs}), sorted({r["depth"] for r in rs})
        cell = {}
        for r in rs:
            cell.setdefault((r["depth"], r["length"]), []).append(r["recall"])
        grid_ = [[float(np.mean(cell.get((d, n), [np.nan]))) for n in lengths] for d in depths]
        result[cond] = summarize(rs)
        write_json_atomic(
            out / model / cond / "summary.json", {"model": model, "condition": cond, **result[cond]}
        )
        plotting.nih_heatmap(
            grid_,
            lengths,
            depths,
            out / model / cond / "heatmap.png",
            f"{model} {cond}: recall {100 * result[cond]['recall']['mean']:.1f}%",
        )
    return result


def table(summaries: dict[str, dict[str, dict]]) -> str:
    """The Markdown summary table (recall and exact match in %, 95% bootstrap CI)."""
    lines = [
        "| model | condition | recall % [95% CI] | recall error % | all-keywords % [95% CI] | empty % | "
        "templates mean ± std | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, conds in summaries.items():
        for cond, s in conds.items():
            lines.append(
                f"| {model} | {cond} | {stats.fmt(s['recall'])} | {100 * s['recall_error']['mean']:.1f} | "
                f"{stats.fmt(s['exact'])} | {100 * s['empty_rate']:.1f} | "
                f"{100 * s['template_mean']:.1f} ± {100 * s['template_std']:.1f} | {s['n']} |"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``ctxaware nih``: run the grid for every ``--model``, then write summaries, heatmaps and a bar chart."""
    cfg = parse_config(NIHConfig, argv, prog="ctxaware nih")
    load_needle(cfg), templates(cfg), load_haystack(cfg.haystack)  # bad input fails before a model loads
    out = Path(cfg.output)
    summaries = {}
    for name in [m.strip() for m in cfg.model.split(",") if m.strip()]:
        short, rows = run_model(cfg, name)
        summaries[short] = report(out, short, rows)
    write_json_atomic(out / "summary.json", summaries)
    md = table(summaries)
    if cfg.steer is not None:
        md += "\n\nAttention steering (paper Table 1; NIH recall):\n\n" + steering_table(summaries)
    (out / "summary.md").write_text(md + "\n")
    bars = {
        c: {
            m: (s["recall_error"]["mean"], s["recall_error"]["ci_low"], s["recall_error"]["ci_high"])
            for m, conds in summaries.items()
            for cc, s in conds.items()
            if cc == c
        }
        for c in dict.fromkeys(c for conds in summaries.values() for c in conds)
    }
    plotting.bar_chart(
        bars,
        out / "conditions.png",
        "NIH recall error by condition (paper Fig. 2)",
        "recall error (1 - recall)",
    )
    print(md)
    print(
        f"results in {out}/ (rows.jsonl, summary.json and heatmap.png per model and condition, conditions.png)"
    )
    return 0
