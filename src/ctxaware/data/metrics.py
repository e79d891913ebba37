"""Per-example metrics and their 95% bootstrap intervals.

- ``contains``: the paper's metric (Sec. 4.1.3, "whether the model response contains the ground-truth answer")
  computed as the authors' lm-eval tasks do (`paper_contains`): SQuAD and QuAC take the SQuAD-normalised gold
  as a substring of the normalised prediction, max over golds; DROP takes the first gold answer only, a raw
  case-insensitive search, and any one of its spans counts.
- ``contains_strict``: ctxaware's stricter rule (`contains_strict`): number-safe normalisation ("5.06" stays
  apart from "50.6"), max over every gold, and a multi-span gold needs every span.
- ``squad_em`` / ``squad_f1``: the official SQuAD script (as in lm-evaluation-harness ``squadv2``), max over golds.
- ``drop_em`` / ``drop_f1``: DROP's number-aware bag F1 exactly as lm-evaluation-harness ``drop/utils.py``
  (number normalisation, per-span bags, optimal 1-1 alignment, max over gold answers).
- conflict sets (context-parametric inversion): ``p_s`` (context answer given), ``p_o`` (memorised answer
  given), memorisation ratio ``p_o / (p_o + p_s)`` of the means.
- MemoTrap: accuracy of the class with the highest log-likelihood.
"""

from __future__ import annotations

import itertools
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

from ctxaware.core.stats import summarize, summarize_proportion

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)
SENTENCE_END = re.compile(r"[.!?](?=\s)")


# --- SQuAD -------------------------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")


def normalize_keep_numbers(s: str) -> str:
    """SQuAD normalisation that keeps a decimal point between digits, so numbers do not merge
    (``normalize_answer`` maps both "5.06" and "50.6" to "506")."""
    s = _DECIMAL_POINT.sub("\x00", s.lower())
    s = "".join(ch for ch in s if ch not in _PUNCT).replace("\x00", ".")
    return " ".join(_ARTICLES.sub(" ", s).split())


def containment(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when some gold answer is a substring of the prediction, both normalised number-safely
    (`normalize_keep_numbers`), max over golds (a plain substring test: "1" is in "10")."""
    pred = normalize_keep_numbers(prediction)
    return max((float(g in pred) for g in map(normalize_keep_numbers, golds) if g), default=0.0)


def contains_normalized(prediction: str, golds: Sequence[str]) -> float:
    """The authors' SQuAD/QuAC ``contains_score`` (lm-eval tasks squad/task.py, quac_no_template/task.py):
    ``re.search(normalize_answer(gold), normalize_answer(prediction), IGNORECASE)``, max over golds."""
    pred = normalize_answer(prediction)
    return max(
        (float(bool(re.search(re.escape(normalize_answer(g)), pred, re.I))) for g in golds), default=0.0
    )


def contains_raw(prediction: str, golds: Sequence[str]) -> float:
    """A raw case-insensitive search of each gold in the prediction, max over golds (no normalisation)."""
    return max((float(bool(re.search(re.escape(g), prediction, re.I))) for g in golds), default=0.0)


def drop_contains_first_gold(prediction: str, spans: Sequence[Sequence[str]]) -> float:
    """The authors' DROP ``contains_score`` (lm-eval drop/utils.py): the FIRST gold answer only, a raw
    case-insensitive search of each of its spans, any span counts."""
    return contains_raw(prediction, spans[0]) if spans and spans[0] else 0.0


def contains_strict(prediction: str, golds: Sequence[str], spans: Sequence[Sequence[str]] = ()) -> float:
    """ctxaware's stricter containment: number-safe normalisation, max over all golds, and a multi-span
    gold (``spans``) counts only when every one of its spans is contained."""
    if spans:
        return max((min(containment(prediction, [s]) for s in g) for g in spans if g), default=0.0)
    return containment(prediction, golds)


CONTAINS_RULES = ("normalized", "drop_first_raw")


def paper_contains(prediction: str, golds: Sequence[str], spans: Sequence[Sequence[str]], rule: str) -> float:
    """The paper's ``contains`` under the authors' rule for the task: ``normalized`` (SQuAD, QuAC) or
    ``drop_first_raw`` (DROP)."""
    if rule == "normalized":
        return contains_normalized(prediction, golds)
    if rule == "drop_first_raw":
        return drop_contains_first_gold(prediction, spans or [[g] for g in golds[:1]])
    raise ValueError(f"unknown contains rule {rule!r}; one of {CONTAINS_RULES}")


def squad_em(prediction: str, golds: Sequence[str]) -> float:
    p = normalize_answer(prediction)
    return max((float(p == normalize_answer(g)) for g in golds), default=0.0)


def _f1_tokens(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:
        return float(pred == gold)  # both empty (no-answer) agree
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    p, r = same / len(pred), same / len(gold)
    return 2 * p * r / (p + r)


def squad_f1(prediction: str, golds: Sequence[str]) -> float:
    """Token-overlap F1 of the official SQuAD script, max over gold answers."""
    pred = normalize_answer(prediction).split()
    return max((_f1_tokens(pred, normalize_answer(g).split()) for g in golds), default=0.0)


# --- DROP (lm-evaluation-harness drop/utils.py) ------------------------------------------------------


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _drop_token(tok: str) -> str:
    tok = tok.lower()
    if not _is_number(tok):
        tok = "".join(ch for ch in tok if ch not in _PUNCT)
    tok = str(float(tok)) if _is_number(tok) else tok  # "2.0" == "2"
    return " ".join(_ARTICLES.sub(" ", tok).split())


def drop_normalize(answer: str) -> str:
    """DROP normalisation per token (split on space and hyphen): punctuation, numbers, articles."""
    toks = [_drop_token(t) for t in re.split(" |-", answer)]
    return " ".join(t for t in toks if t.strip()).strip()


def _bags(answer: str | Sequence[str]) -> tuple[list[str], list[set[str]]]:
    spans = [answer] if isinstance(answer, str) else list(answer)
    norm = [drop_normalize(s) for s in spans]
    return norm, [set(n.split()) for n in norm]


def _bag_f1(pred: set[str], gold: set[str]) -> float:
    inter = len(gold & pred)
    p = inter / len(pred) if pred else 1.0
    r = inter / len(gold) if gold else 1.0
    return 2 * p * r / (p + r) if (p or r) else 0.0


def _numbers_match(gold: set[str], pred: set[str]) -> bool:
    g = {w for w in gold if _is_number(w)}
    return not g or bool(g & {w for w in pred if _is_number(w)})


def _best_assignment(scores: np.ndarray) -> list[tuple[int, int]]:
    """Maximum-weight 1-1 matching (bags are tiny: brute force, scipy beyond 7)."""
    n, m = scores.shape
    if max(n, m) > 7:
        from scipy.optimize import linear_sum_assignment

        return list(zip(*linear_sum_assignment(-scores)))
    if n <= m:
        perms = itertools.permutations(range(m), n)
        best = max(perms, key=lambda p: sum(scores[i, j] for i, j in enumerate(p)), default=())
        return list(enumerate(best))
    best = max(itertools.permutations(range(n), m), key=lambda p: sum(scores[i, j] for j, i in enumerate(p)))
    return [(i, j) for j, i in enumerate(best)]


def drop_em_f1(prediction: str | Sequence[str], gold: str | Sequence[str]) -> tuple[float, float]:
    """EM and F1 of one prediction against one gold answer (lm-eval ``get_metrics``)."""
    pn, pb = _bags(prediction)
    gn, gb = _bags(gold)
    em = float(set(pn) == set(gn) and len(pn) == len(gn))
    scores = np.zeros((len(gb), len(pb)))
    for i, g in enumerate(gb):
        for j, p in enumerate(pb):
            if _numbers_match(g, p):
                scores[i, j] = _bag_f1(p, g)
    best = np.zeros(max(len(gb), len(pb)))
    for i, j in _best_assignment(scores):
        best[i] = max(best[i], scores[i, j])
    return em, round(float(np.mean(best)), 2)


def drop_scores(prediction: str, golds: Sequence[Sequence[str]]) -> tuple[float, float]:
    """Max EM and F1 over gold answers (each a list of spans), skipping empty golds, as lm-eval does."""
    em = f1 = 0.0
    for g in golds:
        e, f = drop_em_f1([prediction], g)
        if g and g[0].strip():
            em, f1 = max(em, e), max(f1, f)
    return em, f1


# --- sentences, conflict, aggregation ----------------------------------------------------------------


def first_sentence(text: str) -> str:
    """The text up to the end of its first complete sentence (paper App. A.3); leading space dropped."""
    text = text.strip()
    m = SENTENCE_END.search(text + " ")
    return text[: m.end()] if m else text


def truncate_at(text: str, stops: Sequence[str]) -> str:
    """lm-evaluation-harness ``generate_until``: the text before the first occurrence of any stop string."""
    for stop in stops:
        text = text.split(stop)[0]
    return text


def qa_scores(
    prediction: str,
    golds: Sequence[str],
    spans: Sequence[Sequence[str]] = (),
    contains_rule: str = "normalized",
) -> dict[str, float]:
    """Every QA metric of one prediction: ``contains`` (the paper's, under ``contains_rule``),
    ``contains_strict``, SQuAD ``em``/``f1``; DROP metrics when ``spans`` (gold span lists) are given."""
    out = {
        "contains": paper_contains(prediction, golds, spans, contains_rule),
        "contains_strict": contains_strict(prediction, golds, spans),
        "em": squad_em(prediction, golds),
        "f1": squad_f1(prediction, golds),
    }
    if spans:
        out["drop_em"], out["drop_f1"] = drop_scores(prediction, spans)
    return out


def conflict_scores(prediction: str, context_answers: Sequence[str], memory_answers: Sequence[str]) -> dict:
    """``p_s``: the context (substituted) answer appears; ``p_o``: the memorised (original) answer appears."""
    return {"p_s": containment(prediction, context_answers), "p_o": containment(prediction, memory_answers)}


def memorization_ratio(
    p_o: Sequence[float], p_s: Sequence[float], n_resamples: int = 2000, seed: int = 0
) -> dict:
    """``mean(p_o) / (mean(p_o) + mean(p_s))`` with a paired percentile-bootstrap 95% interval."""
    o, s = np.asarray(p_o, float), np.asarray(p_s, float)
    if o.size == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}

    def ratio(a, b):
        d = a + b
        return np.where(d > 0, a / np.where(d > 0, d, 1), np.nan)

    idx = np.random.default_rng(seed).integers(0, o.size, size=(n_resamples, o.size))
    boot = ratio(o[idx].mean(1), s[idx].mean(1))
    boot = boot[~np.isnan(boot)]
    m = float(ratio(o.mean(), s.mean()))
    lo, hi = np.quantile(boot, [0.025, 0.975]) if boot.size else (np.nan, np.nan)
    return {"mean": m, "ci_low": float(lo), "ci_high": float(hi), "n": int(o.size)}


METRICS_BY_KIND = {
    "qa": ("contains", "contains_strict", "em", "f1", "drop_em", "drop_f1", "empty"),
    "conflict": ("p_s", "p_o", "empty"),
    "choice": ("accuracy",),
    "mtbench": ("rating", "rating_turn1", "rating_turn2"),
}


# 0/1 per example: a proportion, with the exact Clopper-Pearson interval (`stats.summarize_proportion`);
# F1 scores and judge ratings keep the bootstrap.
PROPORTIONS = frozenset({"contains", "contains_strict", "em", "drop_em", "empty", "p_s", "p_o", "accuracy"})


def aggregate(rows: Sequence[dict], kind: str) -> dict[str, dict]:
    """``{metric: {mean, ci_low, ci_high, n, interval}}`` over result rows (each holding ``scores``)."""
    out: dict[str, dict] = {}
    for name in METRICS_BY_KIND[kind]:
        vals = [r["scores"][name] for r in rows if r.get("scores", {}).get(name) is not None]
        if vals:
            out[name] = summarize_proportion(vals) if name in PROPORTIONS else summarize(vals)
    if kind == "conflict" and rows:
        out["memorization_ratio"] = memorization_ratio(
            [r["scores"]["p_o"] for r in rows], [r["scores"]["p_s"] for r in rows]
        )
    return out
