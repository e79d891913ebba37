"""Metrics against hand-computed values and against lm-evaluation-harness's reference formulas (the oracle
below is lm-eval's squadv2/utils.py and drop/utils.py, restated with scipy's linear_sum_assignment)."""

from __future__ import annotations

import collections
import re
import string

import numpy as np
import pytest

from ctxaware.metrics import (
    aggregate,
    conflict_scores,
    containment,
    drop_em_f1,
    drop_normalize,
    drop_scores,
    first_sentence,
    memorization_ratio,
    normalize_answer,
    qa_scores,
    squad_em,
    squad_f1,
)

# --- oracle: lm-evaluation-harness reference formulas ------------------------------------------------


def ref_normalize(s):
    def remove_articles(t):
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", t)

    def remove_punc(t):
        return "".join(ch for ch in t if ch not in set(string.punctuation))

    return " ".join(remove_articles(remove_punc(s.lower())).split())


def ref_squad_f1(pred, gold):
    g, p = ref_normalize(gold).split() if gold else [], ref_normalize(pred).split() if pred else []
    common = collections.Counter(g) & collections.Counter(p)
    same = sum(common.values())
    if len(g) == 0 or len(p) == 0:
        return int(g == p)
    if same == 0:
        return 0
    pr, rc = same / len(p), same / len(g)
    return 2 * pr * rc / (pr + rc)


def _ref_is_number(t):
    try:
        float(t)
        return True
    except ValueError:
        return False


def _ref_norm_drop(answer):
    def tok(t):
        t = t.lower()
        if not _ref_is_number(t):
            t = "".join(ch for ch in t if ch not in set(string.punctuation))
        t = str(float(t)) if _ref_is_number(t) else t
        return " ".join(re.sub(r"\b(a|an|the)\b", " ", t).split())

    toks = [tok(t) for t in re.split(" |-", answer)]
    return " ".join(t for t in toks if t.strip()).strip()


def ref_drop_get_metrics(predicted, gold):
    from scipy.optimize import linear_sum_assignment

    def bags(a):
        spans = a if isinstance(a, (list, tuple)) else [a]
        n = [_ref_norm_drop(s) for s in spans]
        return n, [set(x.split()) for x in n]

    pn, pb = bags(predicted)
    gn, gb = bags(gold)
    em = 1.0 if set(pn) == set(gn) and len(pn) == len(gn) else 0.0

    def f1(p, g):
        inter = len(g & p)
        pr = 1.0 if not p else inter / len(p)
        rc = 1.0 if not g else inter / len(g)
        return 2 * pr * rc / (pr + rc) if not (pr == 0 and rc == 0) else 0.0

    def numbers_ok(g, p):
        gnum = {w for w in g if _ref_is_number(w)}
        return (not gnum) or bool(gnum & {w for w in p if _ref_is_number(w)})

    scores = np.zeros([len(gb), len(pb)])
    for i, g in enumerate(gb):
        for j, p in enumerate(pb):
            if numbers_ok(g, p):
                scores[i, j] = f1(p, g)
    r, c = linear_sum_assignment(-scores)
    best = np.zeros([max(len(gb), len(pb))])
    for i, j in zip(r, c):
        best[i] = max(best[i], scores[i, j])
    return em, round(float(np.mean(best)), 2)


def ref_drop_process_results(pred, golds):
    max_em = max_f1 = 0
    for g in golds:
        em, f1 = ref_drop_get_metrics([pred], g)
        if g[0].strip():
            max_em, max_f1 = max(max_em, em), max(max_f1, f1)
    return max_em, max_f1


# --- crafted cases -----------------------------------------------------------------------------------

PREDS = [
    "The answer is Paris, France.",
    "the Eiffel Tower",
    "It was 2.0 yards.",
    "Pakistanis and Filipinos",
    "",
    "twenty-three episodes in total",
    "He scored 10 points and 7 assists",
    "An apple a day",
]
GOLDS = [
    ["Paris"],
    ["Eiffel Tower in Paris", "tower"],
    ["2"],
    ["Pakistani and Filipino"],
    ["x"],
    ["23"],
    ["7"],
    ["apple day"],
]


def test_normalize_and_containment_hand_computed():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert containment("The answer is Paris, France.", ["paris"]) == 1.0
    assert containment("Lyon", ["Paris", "Lyon"]) == 1.0  # max over golds
    assert containment("Berlin", ["Paris"]) == 0.0
    assert containment("It was 10 years", ["1"]) == 1.0  # a plain substring test, as the paper defines it
    assert containment("anything", ["", "  "]) == 0.0  # empty golds never match


def test_squad_em_f1_hand_computed():
    assert squad_em("The Eiffel Tower.", ["eiffel tower"]) == 1.0
    # pred {eiffel, tower} vs gold {eiffel, tower, in, paris}: P=1, R=.5 -> F1=2/3
    assert squad_f1("the Eiffel Tower", ["Eiffel Tower in Paris"]) == pytest.approx(2 / 3)
    assert squad_f1("the Eiffel Tower", ["Eiffel Tower in Paris", "tower"]) == pytest.approx(2 / 3)
    assert squad_f1("", ["x"]) == 0.0


@pytest.mark.parametrize("pred,golds", list(zip(PREDS, GOLDS)))
def test_squad_f1_agrees_with_lm_eval(pred, golds):
    assert squad_f1(pred, golds) == pytest.approx(max(ref_squad_f1(pred, g) for g in golds))
    assert normalize_answer(pred) == ref_normalize(pred)


def test_drop_hand_computed():
    assert drop_normalize("2.0 yards") == "2.0 yards"
    assert drop_normalize("The 2 yards") == "2.0 yards"
    assert drop_scores("It was 2.0 yards", [["2"], ["3"]]) == (0.0, 0.4)  # P=1/4 ({it,was,2.0,yards}), R=1
    assert drop_scores("He scored 10 points", [["7"]]) == (0.0, 0.0)  # numbers must match
    assert drop_em_f1(["a b", "c"], ["c", "a b"]) == (1.0, 1.0)  # span order does not matter


@pytest.mark.parametrize("pred,golds", list(zip(PREDS, GOLDS)))
def test_drop_agrees_with_lm_eval(pred, golds):
    spans = [[g] for g in golds]
    assert drop_scores(pred, spans) == ref_drop_process_results(pred, spans)


def test_drop_multi_span_alignment_agrees_with_lm_eval():
    cases = [(["Bob", "Alice 3"], ["Alice 3", "Bob", "Carol"]), (["x y z", "1", "2", "3"], ["2", "x"])]
    for pred, gold in cases:
        assert drop_em_f1(pred, gold) == ref_drop_get_metrics(pred, gold)


def test_multi_span_containment_needs_every_span():
    s = qa_scores("Bob and Alice", ["Bob Alice"], spans=[["Bob", "Alice"]])
    assert s["containment"] == 1.0 and "drop_f1" in s
    assert qa_scores("Bob only", ["Bob Alice"], spans=[["Bob", "Alice"]])["containment"] == 0.0


def test_first_sentence():
    assert first_sentence(" Paris is the capital. It is big.") == "Paris is the capital."
    assert first_sentence("It is 3.5 km long") == "It is 3.5 km long"  # a decimal point ends no sentence
    assert first_sentence("Really? Yes.") == "Really?"


def test_conflict_and_memorization_ratio():
    assert conflict_scores("The capital is Herat.", ["Herat"], ["Kabul"]) == {"p_s": 1.0, "p_o": 0.0}
    r = memorization_ratio([1, 0, 0, 1], [0, 1, 1, 1])  # p_o=.5, p_s=.75 -> .4
    assert r["mean"] == pytest.approx(0.4) and r["ci_low"] <= 0.4 <= r["ci_high"]
    rows = [{"scores": {"p_s": s, "p_o": o, "empty": 0.0}} for s, o in [(1, 0), (0, 1), (1, 0), (1, 1)]]
    agg = aggregate(rows, "conflict")
    assert agg["p_s"]["mean"] == 0.75 and agg["p_o"]["mean"] == 0.5
    assert agg["memorization_ratio"]["mean"] == pytest.approx(0.5 / 1.25)
    assert agg["p_s"]["ci_low"] <= 0.75 <= agg["p_s"]["ci_high"]
