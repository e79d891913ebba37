"""Metrics against hand-computed values and against lm-evaluation-harness's reference formulas (the oracle
below is lm-eval's squadv2/utils.py and drop/utils.py, restated with scipy's linear_sum_assignment)."""

from __future__ import annotations

import collections
import re
import string

import numpy as np
import pytest

from ctxaware.data.metrics import (
    aggregate,
    conflict_scores,
    containment,
    contains_normalized,
    contains_strict,
    drop_contains_first_gold,
    drop_em_f1,
    drop_normalize,
    drop_scores,
    first_sentence,
    memorization_ratio,
    normalize_answer,
    qa_scores,
    squad_em,
    squad_f1,
    truncate_at,
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


def test_multi_span_strict_containment_needs_every_span():
    s = qa_scores(
        "Bob and Alice", ["Bob and Alice"], spans=[["Bob", "Alice"]], contains_rule="drop_first_raw"
    )
    assert s["contains_strict"] == 1.0 and s["contains"] == 1.0 and "drop_f1" in s
    s = qa_scores("Bob only", ["Bob and Alice"], spans=[["Bob", "Alice"]], contains_rule="drop_first_raw")
    assert s["contains_strict"] == 0.0 and s["contains"] == 1.0  # the authors' rule: any span counts


# --- the authors' `contains` (lm-eval tasks in YihanWang617/context_awareness), restated as the oracle ---


def ref_authors_drop_contains(pred: str, golds: list[list[str]]) -> int:
    """drop/utils.py ``contains_score``: first gold only, raw case-insensitive regex search, any span."""
    return max(int(bool(re.search(re.compile(re.escape(ref), re.IGNORECASE), pred))) for ref in golds[0])


def ref_authors_squad_contains(pred: str, golds: list[str]) -> int:
    """squad/task.py ``contains_score`` (normalised gold searched in the normalised prediction)."""
    return max(
        int(bool(re.search(re.compile(re.escape(ref_normalize(g)), re.IGNORECASE), ref_normalize(pred))))
        for g in golds
    )


DROP_CASES = [
    ("The answer is 50.6 billion", [["5.06"]]),
    ("It is 5.06", [["50.6"]]),
    ("Pakistanis and filipinos", [["Pakistanis", "Filipinos"], ["Pakistani", "Filipino"]]),
    ("only FILIPINOS here", [["Pakistanis", "Filipinos"]]),
    ("Tony Romo", [["Terrell Owens"], ["Tony Romo"]]),  # second gold: the authors' rule ignores it
    ("the U.S. won", [["US"]]),  # raw search: punctuation matters
    ("12", [["1"]]),
]


@pytest.mark.parametrize("pred,golds", DROP_CASES)
def test_drop_contains_is_the_authors_rule(pred, golds):
    assert drop_contains_first_gold(pred, golds) == ref_authors_drop_contains(pred, golds)
    s = qa_scores(pred, [" and ".join(g) for g in golds], spans=golds, contains_rule="drop_first_raw")
    assert s["contains"] == ref_authors_drop_contains(pred, golds)


def test_drop_rules_disagree_where_expected():
    # first gold only vs max over golds
    assert drop_contains_first_gold("Tony Romo", [["Terrell Owens"], ["Tony Romo"]]) == 0.0
    assert contains_strict("Tony Romo", [], [["Terrell Owens"], ["Tony Romo"]]) == 1.0
    # any span vs every span
    assert drop_contains_first_gold("only Filipinos", [["Pakistanis", "Filipinos"]]) == 1.0
    assert contains_strict("only Filipinos", [], [["Pakistanis", "Filipinos"]]) == 0.0
    # raw vs normalised
    assert drop_contains_first_gold("the US won", [["U.S."]]) == 0.0
    assert contains_strict("the US won", [], [["U.S."]]) == 1.0


def test_numbers_do_not_merge_under_normalisation():
    # SQuAD normalisation deletes the decimal point: "5.06" and "50.6" both become "506"
    assert normalize_answer("50.6") == normalize_answer("5.06") == "506"
    assert containment("It grew by 5.06 percent", ["50.6"]) == 0.0
    assert containment("It grew by 50.6 percent", ["5.06"]) == 0.0
    assert contains_strict("It grew by 5.06 percent", [], [["50.6"]]) == 0.0
    assert containment("It grew by 50.6 percent.", ["50.6"]) == 1.0  # a sentence-final "." still goes
    assert containment("1,000 men", ["1000"]) == 1.0  # a thousands comma still merges, as it should
    assert conflict_scores("about 5.06 m", ["50.6"], ["5.06"]) == {"p_s": 0.0, "p_o": 1.0}


@pytest.mark.parametrize("pred,golds", list(zip(PREDS, GOLDS)))
def test_squad_contains_is_the_authors_rule(pred, golds):
    assert contains_normalized(pred, golds) == ref_authors_squad_contains(pred, golds)


def test_quac_unanswerable_gold_scores_zero():
    # the authors' QuAC golds for an unanswerable question are ["CANNOTANSWER"]
    s = qa_scores("I cannot answer that from the passage", ["CANNOTANSWER"])
    assert s["contains"] == 0.0 and s["contains_strict"] == 0.0 and s["em"] == 0.0


def test_truncate_at_is_lm_eval_generate_until():
    assert truncate_at(" Paris is big. It is old. ", [". "]) == " Paris is big"
    assert truncate_at("It is 3.5 km. Long", [". "]) == "It is 3.5 km"
    assert truncate_at("Really? Yes", [". "]) == "Really? Yes"


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
    # p_s is a proportion: the exact Clopper-Pearson interval of 3/4 (hand value: [0.1941, 0.9937]), which
    # exists at n = 4 where a bootstrap has too few values (stats.MIN_N_FOR_CI)
    assert agg["p_s"]["interval"] == "clopper-pearson"
    assert agg["p_s"]["ci_low"] == pytest.approx(0.19412, abs=1e-4)
    assert agg["p_s"]["ci_high"] == pytest.approx(0.99369, abs=1e-4)


def test_proportion_intervals_do_not_collapse_at_the_ends():
    """Issue 22 §5: 100/100 and 98/100 get the exact Clopper-Pearson interval ([96.4, 100] and [93.0, 99.8],
    the published values), not the bootstrap's [100, 100] and [95, 100]; a mean of sevenths gets Wilson's
    (15/20 -> [0.5313, 0.8881], the textbook value)."""
    from ctxaware.core.stats import fmt, summarize_proportion

    s = summarize_proportion([1.0] * 100)
    assert s["interval"] == "clopper-pearson" and fmt(s) == "100.0 [96.4, 100.0]"
    assert fmt(summarize_proportion([1.0] * 98 + [0.0] * 2)) == "98.0 [93.0, 99.8]"
    w = summarize_proportion([1.0, 0.5] * 10)  # mean 0.75 over n = 20, not all 0/1
    assert w["interval"] == "wilson"
    assert (round(w["ci_low"], 4), round(w["ci_high"], 4)) == (0.5313, 0.8881)
    with pytest.raises(ValueError):
        summarize_proportion([1.5])


def test_nih_summary_counts_distinct_prompts_and_one_template():
    """Two budgets that give the same prompt (same context size, depth and template) count once in n and in
    the interval; the template spread is reported only when several templates ran."""
    from ctxaware.evaluation import nih

    def row(length, ctx, recall, template=1):
        return {"condition": "chat+prefix", "template": template, "indicator": False, "depth": 50.0,
                "length": length, "context_tokens": ctx, "n_prompt_tokens": ctx + 40, "recall": recall,
                "exact": float(recall == 1), "empty": 0.0}  # fmt: skip

    rows = [row(200, 180, 1.0), row(400, 180, 1.0), row(600, 380, 0.0)]
    s = nih.summarize(rows)
    assert s["n"] == 2 and s["n_cells"] == 3 and s["recall"]["mean"] == 0.5
    assert "template_mean" not in s and "templates" not in nih.table({"m": {"chat+prefix": s}})
    s2 = nih.summarize(rows + [row(600, 380, 1.0, template=2)])
    assert s2["template_mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert "templates mean" in nih.table({"m": {"chat+prefix": s2}})
