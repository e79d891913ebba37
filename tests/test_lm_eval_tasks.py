"""Issue 25 section 4: ctxaware's evaluations inside lm-evaluation-harness.

The pack's prompts are checked against ``ctxaware eval/nih --dump-prompts`` (text and ids), its scores
against hand-computed cases, and a real ``lm_eval`` run (hf backend, SmolLM2) against ``ctxaware eval`` and
``ctxaware nih`` on the same examples: the same prompts, outputs and scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctxaware.core.errors import CtxawareError
from ctxaware.evaluation.lm_eval_tasks import TASK_DIR, hooks, task_names

lm_eval = pytest.importorskip("lm_eval")

NIH_GRID = {"lengths": [300, 500], "depths": [0, 25, 50, 75, 100]}


def _ctxaware(*argv: str) -> None:
    from ctxaware.cli import main

    assert main(list(argv)) == 0


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_the_pack_names_its_directory_and_lm_eval_finds_every_task(capsys):
    from lm_eval.tasks import TaskManager

    _ctxaware("lm-eval-tasks")
    assert Path(capsys.readouterr().out.strip()) == TASK_DIR
    names = task_names()
    assert {
        "ctxaware_squad",
        "ctxaware_drop_plain",
        "ctxaware_nqswap",
        "ctxaware_nih_chat",
        "ctxaware_qa",
    } <= set(names)
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    assert set(names) <= set(tm.all_tasks)
    out = subprocess.run(
        [sys.executable, "-m", "ctxaware.evaluation.lm_eval_tasks"], capture_output=True, text=True
    )
    assert Path(out.stdout.strip()) == TASK_DIR


def test_qa_prompts_equal_ctxaware_eval_dump(smollm2_tok, shared_data, tmp_path):
    """The pack's SQuAD/NQ-Swap prompts, chat and plain, are ``ctxaware eval --dump-prompts``'s, in its
    seeded order: lm-eval's ``--limit 5`` takes the examples of ``ctxaware eval --limit 5``."""
    model_dir = smollm2_tok.name_or_path
    for task, mode in (("squad", "chat"), ("squad", "plain"), ("nqswap", "chat")):
        dump = tmp_path / f"{task}_{mode}.jsonl"
        _ctxaware(
            "eval", task, "--model", "default", "--modes", mode, "--limit", "5", "--dump-prompts", str(dump)
        )
        want = _rows(dump)
        docs = hooks.qa_dataset(ctxaware_task=task, mode=mode, pretrained=model_dir, dtype="float32")["test"]
        got = [docs[i] for i in range(5)]
        assert [d["id"] for d in got] == [w["id"] for w in want]
        assert [d["prompt"] for d in got] == [w["prompt_text"] for w in want]
        # lm-eval's hf backend encodes the context with the tokenizer's own special-token rule
        assert [smollm2_tok(d["prompt"])["input_ids"] for d in got] == [w["input_ids"] for w in want]


def test_nih_prompts_equal_ctxaware_nih_dump(smollm2_tok, shared_data, tmp_path):
    model_dir = smollm2_tok.name_or_path
    for mode, prefix in (("chat", True), ("plain", True), ("chat", False)):
        dump = tmp_path / f"nih_{mode}_{prefix}.jsonl"
        _ctxaware("nih", "--model", "default", "--lengths", "300,500", "--depths", "0,25,50,75,100", "--modes", mode,
                  "--prefix", str(prefix).lower(), "--dump-prompts", str(dump))  # fmt: skip
        want = _rows(dump)
        docs = hooks.nih_dataset(mode=mode, prefix=prefix, pretrained=model_dir, **NIH_GRID)["test"]
        assert len(docs) == len(want) == 10
        assert [(d["length"], d["depth"], d["prompt"]) for d in docs] == [
            (w["length"], w["depth"], w["prompt_text"]) for w in want
        ]
        assert [smollm2_tok(d["prompt"])["input_ids"] for d in docs] == [w["input_ids"] for w in want]


def test_scores_are_ctxaware_scores_on_hand_computed_cases():
    squad = {
        "task": "squad",
        "example": json.dumps({"id": "1", "question": "q", "answers": ["Dolores Park"]}),
    }
    # lm-eval cuts at ". "; contains: the normalised gold is in the answer; em/f1 are SQuAD's
    assert hooks.qa_process_results(squad, ["In Dolores Park"]) == {
        "contains": 1.0, "contains_strict": 1.0, "em": 0.0, "f1": 0.8, "empty": 0.0}  # fmt: skip
    assert hooks.qa_process_results(squad, ["the dolores park"])["em"] == 1.0  # articles and case dropped
    cf = {"task": "nqswap", "example": json.dumps({"id": "2", "question": "q", "answers": ["Obama"],
                                                    "memory_answers": ["Bush"]})}  # fmt: skip
    r = hooks.qa_process_results(cf, ["George Bush"])
    assert (r["p_s"], r["p_o"], r["memorization_ratio"]) == (0.0, 1.0, (1.0, 0.0))
    # memorisation ratio over three answers: mean p_o 2/3, mean p_s 1/3 -> (2/3) / (2/3 + 1/3)
    assert hooks.memorization_ratio([(1.0, 0.0), (1.0, 0.0), (0.0, 1.0)]) == pytest.approx(2 / 3)
    nih = {"keywords": json.dumps(["eat", "sandwich", "dolores", "park"])}
    assert hooks.nih_process_results(nih, [" is to eat a sandwich."]) == {
        "recall": 0.5,
        "exact": 0.0,
        "empty": 0.0,
    }
    assert (
        hooks.nih_process_results(nih, ["Eat a sandwich in Dolores-Park"])["exact"] == 1.0
    )  # '-' is a space


def test_bad_metadata_says_what_to_do():
    with pytest.raises(CtxawareError, match="pretrained=... or tokenizer="):
        hooks.qa_dataset(ctxaware_task="squad", mode="chat")
    with pytest.raises(CtxawareError, match="authors' protocol"):
        hooks.qa_dataset(ctxaware_task="squad", mode="chat", pretrained="x", protocol="ctxaware")
    with pytest.raises(CtxawareError, match="mt_bench is a mtbench task"):
        hooks.qa_dataset(ctxaware_task="mt_bench", mode="chat", pretrained="default")


def test_lm_eval_hf_backend_equals_ctxaware_eval_and_nih(smollm2_tok, shared_data, tmp_path):
    """A real ``lm_eval`` run (its CLI, hf backend, greedy, batch 1) on 10 SQuAD questions and 10 NIH tests
    gives the prompts, outputs and scores of ``ctxaware eval`` / ``ctxaware nih`` on the same examples."""
    model_dir = smollm2_tok.name_or_path
    out = tmp_path / "lm_eval"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
           "--device", "cpu", "--batch_size", "1", "--include_path", str(TASK_DIR),
           "--tasks", "ctxaware_squad,ctxaware_nih_chat", "--limit", "10", "--log_samples", "--output_path", str(out),
           "--metadata", json.dumps(NIH_GRID)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    samples = {
        t: _rows(next(out.rglob(f"samples_{t}_*.jsonl"))) for t in ("ctxaware_squad", "ctxaware_nih_chat")
    }
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]

    _ctxaware("eval", "squad", "--model", "default", "--modes", "chat", "--limit", "10", "--device", "cpu",
              "--dtype", "float32", "--batch-size", "1", "--output", str(tmp_path / "qa"))  # fmt: skip
    qa = {r["id"]: r for r in _rows(next((tmp_path / "qa").rglob("rows.jsonl")))}
    lm = {s["doc"]["id"]: s for s in samples["ctxaware_squad"]}
    assert len(lm) == len(qa) == 10 and lm.keys() == qa.keys()
    for i, s in lm.items():
        assert s["arguments"]["gen_args_0"]["arg_0"] == qa[i]["prompt"], i
        assert s["filtered_resps"][0] == qa[i]["prediction"], i
        assert {k: s[k] for k in ("contains", "em", "f1")} == {
            k: qa[i]["scores"][k] for k in ("contains", "em", "f1")
        }
    contains = sum(r["scores"]["contains"] for r in qa.values()) / 10
    assert results["ctxaware_squad"]["contains,none"] == pytest.approx(contains)
    assert 0 < contains < 1 or any(r["prediction"] for r in qa.values())  # real answers, not 10 empty ones

    _ctxaware("nih", "--model", "default", "--lengths", "300,500", "--depths", "0,25,50,75,100", "--modes", "chat",
              "--prefix", "true", "--device", "cpu", "--dtype", "float32", "--batch-size", "1",
              "--output", str(tmp_path / "nih"))  # fmt: skip
    nih = {(r["length"], r["depth"]): r for r in _rows(next((tmp_path / "nih").rglob("rows.jsonl")))}
    lm = {(s["doc"]["length"], s["doc"]["depth"]): s for s in samples["ctxaware_nih_chat"]}
    assert len(lm) == len(nih) == 10 and lm.keys() == nih.keys()
    for k, s in lm.items():
        assert s["filtered_resps"][0] == nih[k]["output"], k
        assert (s["recall"], s["exact"]) == (nih[k]["recall"], nih[k]["exact"]), k
    assert results["ctxaware_nih_chat"]["recall,none"] == pytest.approx(
        sum(r["recall"] for r in nih.values()) / 10
    )
    assert any(r["recall"] > 0 for r in nih.values())
