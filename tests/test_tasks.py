"""Loaders read every shared file (row counts from ../shared/data/README.md); malformed rows are skipped
with a reason; sampling is deterministic; prompts are the paper's templates (Tables 5-6)."""

from __future__ import annotations

import json

import pytest

from ctxaware.core.errors import CtxawareError
from ctxaware.core.results import SkipCounter
from ctxaware.data.tasks import TASKS, Example, _split_quac_answers, get_task, load_examples, sample

# task -> (rows in the README, valid examples after the answerable-only filter)
COUNTS = {
    "squad": (626, 293),  # 293 answerable, the rest is_impossible
    "quac": (50, 50),  # 50 dialogs: the first question of each (the authors' protocol), 3 CANNOTANSWER kept
    "drop": (9536, 9536),
    "cf_world_facts": (313, 313),
    "cf_country_capitals": (196, 196),
    "cf_bio": (555, 555),
    "nqswap": (4746, 4746),
    "memotrap": (936, 936),
    "mt_bench": (80, 80),
}


@pytest.mark.parametrize("name", list(COUNTS))
def test_loaders_read_every_shared_file(shared_data, name):
    skips, repaired = SkipCounter(), SkipCounter()
    ex = load_examples(get_task(name), "local", shared_data, skips, repaired)
    rows, valid = COUNTS[name]
    assert len(ex) == valid and len(ex) + skips.total == rows
    assert len({e.id for e in ex}) == len(ex)  # ids key the results file
    if name == "memotrap":
        assert repaired.total == 936 and ex[0].classes == [" heavy.", " fonder."] and ex[0].label == 0
    if name == "drop":
        assert ex[5].spans == [["67.2"]]
    if name == "nqswap":
        assert ex[0].answers == ["775"] and ex[0].memory_answers == ["23"]


def test_quac_answers_split_at_passage_spans():
    passage = "In May 1983, she married Nikos Karvelas, a composer, with whom she worked."
    block = "In May 1983, she married Nikos Karvelas, In May 1983, she married Nikos Karvelas, a composer,"
    assert _split_quac_answers(block, passage) == [
        "In May 1983, she married Nikos Karvelas,",
        "In May 1983, she married Nikos Karvelas, a composer,",
    ]


def test_malformed_rows_are_counted_and_skipped(tmp_path):
    rows = [
        {"context": "C is here.", "question": "Q?", "answer": "C", "memory_answer": "M"},
        {"context": "", "question": "Q?", "answer": "C", "memory_answer": "M"},  # empty context
        {"question": "Q?", "answer": "C", "memory_answer": "M"},  # missing context
        {"context": "C", "question": "Q?", "answer": "", "memory_answer": "M"},  # empty answer
        {"context": "C", "question": "Q?", "answer": "['C', 'D']", "memory_answer": "['M']"},  # stringified
        {"context": "C", "question": "Q?", "answer": "['C'", "memory_answer": "M"},  # broken stringified list
    ]
    (tmp_path / "conflict").mkdir()
    (tmp_path / "conflict" / "cf_world_facts.json").write_text(json.dumps(rows))
    skips, repaired = SkipCounter(), SkipCounter()
    ex = load_examples(get_task("cf_world_facts"), "local", tmp_path, skips, repaired)
    assert [e.answers for e in ex] == [["C"], ["C", "D"]]
    assert skips.total == 4 and skips.counts["missing or empty context"] == 2
    assert skips.counts["answer is an unparseable stringified list"] == 1
    assert repaired.total == 2  # answer and memory_answer of row 4, parsed and counted


def test_malformed_jsonl_line_and_drop_layout(tmp_path):
    (tmp_path / "qa").mkdir()
    import gzip

    with gzip.open(tmp_path / "qa" / "drop_dev_simple_evals.jsonl.gz", "wt") as f:
        f.write(
            json.dumps({"context": "Passage: P 3 and 4.\nQuestion: Sum?\nAnswer:", "ref_text": "7|seven"})
            + "\n"
        )
        f.write("{not json\n")
        f.write(json.dumps({"context": "no passage marker", "ref_text": "1"}) + "\n")
    skips = SkipCounter()
    ex = load_examples(get_task("drop"), "local", tmp_path, skips)
    assert len(ex) == 1 and ex[0].context == "P 3 and 4." and ex[0].question == "Sum?"
    assert ex[0].spans == [["7"], ["seven"]] and skips.total == 2


def test_drop_local_multi_span_golds_are_split_at_passage_spans(shared_data):
    """The simple-evals file joins a multi-span gold with " and "; spans that are passage spans come back."""
    ex = load_examples(get_task("drop"), "local", shared_data)
    byq = {e.question: e for e in ex}
    e = byq["What two nationalities had the same number of people living in Bahrain between 2005-2009?"]
    assert e.spans == [["Pakistanis", "Filipinos"], ["Pakistani", "Filipino"]]
    assert e.answers[0] == "Pakistanis and Filipinos"
    # a gold that is itself a passage span stays whole even when it holds " and "
    whole = [g for x in ex for g in x.spans if len(g) == 1 and " and " in g[0]]
    assert whole and all(g[0].lower() in x.context.lower() for x in ex for g in x.spans if g in whole[:1])


def test_quac_is_the_first_question_of_each_dialog(shared_data):
    """The authors' lm-eval quac task: questions[0] of each dialog, unanswerable kept with gold CANNOTANSWER."""
    rows = [json.loads(x) for x in (shared_data / "qa" / "quac_val_tiny.jsonl").read_text().splitlines()]
    ex = load_examples(get_task("quac"), "local", shared_data)
    assert len(ex) == len(rows) == 50
    first = [r["question"].splitlines()[0].removeprefix("question1: ") for r in rows]
    assert [e.question for e in ex] == first
    unans = [e for e in ex if e.category == "unanswerable"]
    assert len(unans) == 3 and all(e.answers == ["CANNOTANSWER"] for e in unans)
    assert all("CANNOTANSWER" not in e.context for e in ex)
    assert ex[0].answers[0] == "In May 1983, she married Nikos Karvelas,"


def test_mt_bench_alias():
    assert get_task("mt-bench") is get_task("mt_bench") is TASKS["mt_bench"]


def test_unknown_task_lists_available():
    with pytest.raises(CtxawareError, match="available tasks: squad, quac, drop"):
        get_task("sqad")


def test_sampling_is_deterministic_and_nested():
    ex = [Example(str(i), "q") for i in range(50)]
    a, b = sample(ex, 10, seed=3), sample(ex, 10, seed=3)
    assert [e.id for e in a] == [e.id for e in b]
    assert [e.id for e in sample(ex, 5, seed=3)] == [e.id for e in a[:5]]
    assert [e.id for e in sample(ex, 10, seed=4)] != [e.id for e in a]


def test_paper_prompts():
    ex = Example("1", "Who?", "Some passage.")
    assert (
        TASKS["squad"].prompt(ex, "paper")
        == "Some passage.\nAnswer the question according to the above passage: Who?"
    )
    assert TASKS["drop"].prompt(ex, "paper") == TASKS["squad"].prompt(ex, "paper")
    assert TASKS["quac"].prompt(ex, "paper").endswith("with pieces from the the above passage: Who?")
    assert TASKS["squad"].prompt(ex, "simple") == "Some passage. Who?"
    assert TASKS["nqswap"].prompt(ex, "paper") == "Background: Some passage. Question: Who?"


def test_hub_converters_on_hub_shaped_rows():
    """The hub layouts (rajpurkar/squad, EleutherAI/drop, allenai-style QuAC) go through the same converters."""
    sq = TASKS["squad"].convert(
        {"id": "a", "context": "C", "question": "Q", "answers": {"text": ["x"], "answer_start": [0]}}
    )
    assert sq.answers == ["x"]
    doc = {
        "query_id": "q1",
        "passage": "P",
        "question": "Q",
        "answer": {"number": "", "date": {"day": "", "month": "", "year": ""}, "spans": ["A", "B"]},
        "validated_answers": {"number": ["3"], "date": [{"day": "", "month": "", "year": ""}], "spans": [[]]},
    }
    rows = list(TASKS["drop"].read_hub(doc))
    assert TASKS["drop"].convert(rows[0]).spans == [["A", "B"], ["3"]]
    dialog = {  # ucla-cmllab/quac: every passage ends with "CANNOTANSWER"
        "dialogue_id": "d",
        "wikipedia_page_title": "T",
        "background": "B.",
        "context": "Passage text. CANNOTANSWER",
        "questions": ["q1", "q2"],
        "answers": {"texts": [["a1", "a2"], ["CANNOTANSWER"]], "answer_starts": [[0], [-1]]},
    }
    flat = list(TASKS["quac"].read_hub(dialog))
    assert len(flat) == 1 and flat[0]["answers"] == ["a1", "a2"] and flat[0]["question"] == "q1"
    ex = TASKS["quac"].convert(flat[0])
    # the authors' doc_to_text: 'Title: ' + title + '\n' + background + ' ' + context.removesuffix('CANNOTANSWER')
    assert TASKS["quac"].prompt(ex, "paper") == (
        "Title: T\nB. Passage text.\nAnswer the question with pieces from the the above passage: q1"
    )
    unans = {**dialog, "answers": {"texts": [["CANNOTANSWER"]], "answer_starts": [[-1]]}}
    ex = TASKS["quac"].convert(next(TASKS["quac"].read_hub(unans)))
    assert ex.answers == ["CANNOTANSWER"] and ex.category == "unanswerable"


def test_wrongly_typed_fields_are_skipped_and_counted(tmp_path):
    """Issue 23 §4: rows whose fields have the wrong type (a number for a context, a list for a question,
    turns that are not two strings, a reference that is not a list) are skipped with a reason and counted;
    the well-formed rows around them load."""
    import json

    from ctxaware.core.results import SkipCounter
    from ctxaware.data.tasks import get_task, load_examples

    (tmp_path / "qa").mkdir()
    squad = {"data": [{"paragraphs": [
        {"context": 5, "qas": [{"id": "bad", "question": "q?", "answers": [{"text": "a"}]}]},
        {"context": "Paris is in France.", "qas": [{"id": "ok", "question": "Where is Paris?",
                                                    "answers": [{"text": "France"}]},
                                                   {"id": "bad2", "question": ["x"], "answers": [{"text": "a"}]}]},
    ]}]}  # fmt: skip
    (tmp_path / "qa" / "squad_v2_dev_small.json").write_text(json.dumps(squad))
    (tmp_path / "general").mkdir()
    mt = [{"question_id": 1, "category": "math", "turns": 5}, {"question_id": 2, "turns": ["a", 3]},
          {"question_id": 3, "turns": ["a", "b"], "reference": 5}, {"question_id": 4, "turns": ["a", "b"]}]  # fmt: skip
    (tmp_path / "general" / "mt_bench_questions.jsonl").write_text("\n".join(map(json.dumps, mt)) + "\n")
    for task, good, bad in (("squad", ["ok"], 2), ("mt_bench", ["4"], 3)):
        skips = SkipCounter()
        ex = load_examples(get_task(task), "local", tmp_path, skips)
        assert [e.id for e in ex] == good and skips.total == bad, (task, skips.as_dict())
