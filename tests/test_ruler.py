"""RULER-class tasks (issue 28): generated examples against RULER's and HELMET's stated formats, the length
rule, the paired conditions, the metrics by hand, and a short real run on SmolLM2."""

from __future__ import annotations

import json
import re

import pytest

from ctxaware.core.errors import CtxawareError
from ctxaware.data import ruler
from ctxaware.data.ruler import TASKS, make_example, string_match_all, substring_exact_match

NEEDLE_RE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
ESSAY = [f"Sentence number {i} of the essay." for i in range(400)]


def _value_ok(kind: str, v: str) -> bool:
    return bool(re.fullmatch(r"[1-9]\d{6}", v)) if kind == "numbers" else bool(UUID_RE.match(v))


@pytest.mark.parametrize("name", [n for n, t in TASKS.items() if t.family == "niah"])
def test_niah_examples_follow_rulers_format(name):
    task = TASKS[name]
    ex = make_example(task, 60, seed=7, index=3, essay=ESSAY)
    needles = NEEDLE_RE.findall(ex.user)
    num_k = max(task.num_k, task.num_q)
    planted = [
        n for n in needles if n[2] in {v for v in ex.answers} or f"{n[1]}" in ex.user.split("for ")[-1]
    ]
    assert len(ex.needles) == num_k * task.num_v  # RULER: num_needle_k keys x num_needle_v values
    for needle in ex.needles:
        assert ex.user.count(needle) == 1
    assert len(ex.answers) == task.num_q * task.num_v and len(set(ex.answers)) == len(ex.answers)
    assert all(_value_ok(task.type_v, a) for a in ex.answers)
    assert all(any(a in n for n in ex.needles) for a in ex.answers)
    if task.haystack == "needle":  # every haystack line is a distractor needle with its own key
        assert len(needles) == 60 + len(ex.needles) and len(planted) >= len(ex.answers)
    if task.haystack == "repeat":
        assert ex.user.count("The grass is green.") == 60
    if task.haystack == "essay":  # needles sit between the essay's sentences, which stay in order
        kept = [int(x) for x in re.findall(r"Sentence number (\d+) ", ex.user)]
        assert kept == list(range(60))
    if task.type_k == "words":
        key = ex.needles[0].split(" for ")[1].split(" is:")[0]
        adj, noun = key.split("-")
        assert adj in ruler.ADJECTIVES and noun in ruler.NOUNS
    single = task.num_q * task.num_v == 1  # RULER's singular wording
    assert ex.user.startswith("A special magic" if single else "Some special magic")
    assert ("What is the special magic" if single else "What are all the special magic") in ex.user
    assert ex.answer_prefix.endswith("mentioned in the provided text " + ("is" if single else "are"))
    if task.num_q == 4:  # several keys asked at once: "k1, k2, k3, and k4"
        assert ex.user.count(", and ") >= 1
    assert ex.new_tokens == 128


def test_vt_json_kv_and_determinism():
    vt = make_example(TASKS["vt"], 12, seed=1, index=0)
    chain = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d{5})", vt.user)
    assert len(chain) == 5 and chain[0][1].isdigit()  # 4 hops: the value, then 4 assignments
    assert [c[0] for c in chain] == vt.answers  # every variable holding the value is an answer
    assert all(chain[i + 1][1] == f"VAR {chain[i][0]}" for i in range(4))
    assert f"assigned the value {chain[0][1]} in the text above" in vt.user and vt.new_tokens == 30
    assert "5 variables are assgined the value" in vt.answer_prefix  # RULER's own spelling
    kv = make_example(TASKS["json_kv"], 25, seed=1, index=0)
    obj = json.loads(kv.user.split("JSON data:\n", 1)[1].split("\n\nExtract")[0])
    key = json.loads(kv.user.rsplit("Key: ", 1)[1])
    assert len(obj) == 25 and obj[key] == kv.answers[0] and UUID_RE.match(key)
    assert kv.answer_prefix == "Corresponding value:" and kv.new_tokens == 100
    for name, task in TASKS.items():
        a, b = make_example(task, 30, 5, 2, ESSAY), make_example(task, 30, 5, 2, ESSAY)
        assert (a.user, a.answers) == (b.user, b.answers), name
        assert make_example(task, 30, 5, 3, ESSAY).user != a.user, name


def test_metrics_by_hand():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456", "789", "000"]) == 0.5
    assert ruler.string_match_part("abc 456", ["123", "456"]) == 1.0
    # HELMET normalises both sides (lower case, no punctuation, no articles, one space)
    assert substring_exact_match("Corresponding value: The ABC-def!", ["abc-def"]) == 1.0
    assert substring_exact_match("value: abc def", ["abc-def"]) == 0.0  # "abcdef" is not in "value abc def"
    assert substring_exact_match("value: ABCdef.", ["abcdef"]) == 1.0


def test_length_rule_and_paired_twins(smollm2_tok):
    from ctxaware.evaluation.ruler import RulerConfig, build_examples, render_condition

    cfg = RulerConfig(tasks=["niah_multikey_2", "json_kv"], lengths=[400], n=2, haystack="synthetic",
                      output="/tmp/unused-ruler")  # fmt: skip
    built = build_examples(cfg, smollm2_tok)
    assert len(built) == 4
    for ex, length, rs in built:
        task = TASKS[ex.task]
        longest = max(len(r) for r in rs.values())
        assert longest + task.new_tokens <= length  # RULER: the whole prompt plus the answer fits the length
        bigger = make_example(task, ex.size + 1, cfg.seed, ex.index)  # and the haystack is as large as fits
        assert max(len(render_condition(bigger, smollm2_tok, c)) for c in rs) + task.new_tokens > length
        texts = {c: r.text for c, r in rs.items()}
        for c in rs:  # the same haystack and needles in every condition
            assert ex.user in texts[c] or all(n in texts[c] for n in ex.needles)
        assert texts["chat+prefix"].endswith(" " + ex.answer_prefix) and texts["plain+prefix"].endswith(
            " " + ex.answer_prefix
        )
        assert "<|im_start|>" in texts["chat"] and "<|im_start|>" not in texts["plain"]


def test_a_short_real_run_is_paired(tmp_path):
    from ctxaware.cli import main

    out = tmp_path / "r"
    assert main(["ruler", "--tasks", "niah_single_1", "--lengths", "320", "--n", "2", "--device", "cpu",
                 "--dtype", "float32", "--output", str(out)]) == 0  # fmt: skip
    rows = [json.loads(x) for x in (out / "smollm2-135m-instruct" / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["condition"] for r in rows} == {
        "chat+prefix",
        "plain+prefix",
        "chat",
        "plain",
    }
    for r in rows:
        assert r["score"] == string_match_all(r["output"], r["answers"]) and r["n_prompt_tokens"] + 128 <= 320
        assert set(next(iter(r["attention"].values()))) >= {"raw", "paper", "sink_excluded"}
    s = json.loads((out / "smollm2-135m-instruct" / "summary.json").read_text())["niah_single_1@320"]
    by = {(r["condition"], r["index"]): r["score"] for r in rows}
    want = sum(by[("chat+prefix", i)] - by[("plain+prefix", i)] for i in (0, 1)) / 2
    assert s["paired"]["chat+prefix - plain+prefix"]["mean"] == pytest.approx(want)
    assert s["paired"]["chat - plain"]["n"] == 2
    from ctxaware.reporting.report import write_report

    md = write_report([out], tmp_path / "r.html").with_suffix(".md").read_text()
    assert (
        "## RULER-class retrieval, chat vs plain: smollm2-135m-instruct" in md
        and "chat+prefix - plain+prefix" in md
    )


def test_steering_rows_and_alpha_one_is_the_unsteered_model(tmp_path):
    """Issue 28 section 3: --steer adds eq. (1)-steered chat rows per alpha; alpha = 1 leaves the model
    untouched (steering.steer skips the bias), so those rows equal the unsteered chat rows token for token."""
    from ctxaware.cli import main

    out = tmp_path / "s"
    assert main(["ruler", "--tasks", "niah_single_1", "--lengths", "320", "--n", "2", "--conditions", "chat,plain",
                 "--steer", "all", "--alpha", "1.0", "--device", "cpu", "--dtype", "float32", "--output", str(out)]) == 0  # fmt: skip
    rows = [json.loads(x) for x in (out / "smollm2-135m-instruct" / "rows.jsonl").read_text().splitlines()]
    by = {(r["condition"], r["index"]): r for r in rows}
    assert {c for c, _ in by} == {"chat", "plain", "chat+steer1"}
    for i in (0, 1):
        assert by[("chat+steer1", i)]["output"] == by[("chat", i)]["output"]
    s = json.loads((out / "smollm2-135m-instruct" / "summary.json").read_text())["niah_single_1@320"][
        "paired"
    ]
    assert s["chat+steer1 - chat"]["mean"] == 0.0 and "plain - chat+steer1" in s
    assert main(["ruler", "--alpha", "0.5", "--output", str(tmp_path / "x")]) == 2  # --alpha needs --steer
    # PASTA's prompt-only steering is its own condition and its own run (the option is in the fingerprint)
    meta = json.loads((out / "smollm2-135m-instruct" / "meta.json").read_text())
    assert "steer_generated" not in json.dumps(meta)  # eq. (1) as stated: runs made before the option resume
    args = ["ruler", "--tasks", "niah_single_1", "--lengths", "320", "--n", "2", "--conditions", "chat",
            "--steer", "all", "--alpha", "0.5", "--no-steer-generated", "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    assert main([*args, "--output", str(out)]) == 2  # another option, the same folder: refused
    assert main([*args, "--output", str(tmp_path / "p")]) == 0
    rows = [
        json.loads(x)
        for x in (tmp_path / "p" / "smollm2-135m-instruct" / "rows.jsonl").read_text().splitlines()
    ]
    assert {r["condition"] for r in rows} == {"chat", "chat+steer0.5+promptonly"}


def _row(task: str, i: int, cond: str, score: float, raw: float, size: int = 10) -> dict:
    return {"task": task, "length": 1024, "index": i, "condition": cond, "score": score, "haystack_size": size,
            "answers": [str(i)], "n_prompt_tokens": 900, "attention": {"15": {"raw": {"user": raw}, "sink_excluded": {"user": raw}}}}  # fmt: skip


def test_compare_is_the_difference_in_differences_by_hand():
    """Two models on the same contexts: the change in the template's cost is (B_chat - B_plain) - (A_chat -
    A_plain) per example, averaged; pooled over tasks; an example whose prompt differs is not paired."""
    from ctxaware.evaluation.ruler import compare, compare_markdown

    a, b = [], []
    for i in range(10):  # task x: the base loses nothing to the template, the tuned model 3 of 10
        a += [_row("x", i, "chat+prefix", 1, 0.5), _row("x", i, "plain+prefix", 1, 0.6)]
        b += [_row("x", i, "chat+prefix", float(i >= 3), 0.3), _row("x", i, "plain+prefix", 1, 0.6)]
    for i in range(10):  # task y: both 50 / 50, the tuned model's chat rows swapped
        a += [_row("y", i, "chat+prefix", i % 2, 0.5), _row("y", i, "plain+prefix", i % 2, 0.5)]
        b += [_row("y", i, "chat+prefix", 1 - i % 2, 0.5), _row("y", i, "plain+prefix", i % 2, 0.5)]
    b += [_row("y", 10, "chat+prefix", 0, 0.5, size=11), _row("y", 10, "plain+prefix", 1, 0.5, size=11)]
    a += [_row("y", 10, "chat+prefix", 1, 0.5), _row("y", 10, "plain+prefix", 1, 0.5)]
    c = compare({"base": a, "sft": b})
    g = c["models"]["sft"]["groups"]
    assert c["models"]["sft"]["unpaired"] == 1 and list(g) == ["x@1024", "y@1024", "all"]
    assert g["x@1024"]["cost_ref"]["mean"] == 0 and g["x@1024"]["cost"]["mean"] == pytest.approx(-0.3)
    assert g["x@1024"]["change_in_cost"]["mean"] == pytest.approx(-0.3)
    assert g["x@1024"]["change chat+prefix"]["mean"] == pytest.approx(-0.3)
    assert g["x@1024"]["change plain+prefix"]["mean"] == 0
    # the template's raw user-share shift: base 0.5 - 0.6 = -0.1, tuned 0.3 - 0.6 = -0.3: change -0.2
    assert g["x@1024"]["change_in_user_share_shift"]["mean"] == pytest.approx(-0.2)
    assert g["y@1024"]["change_in_cost"]["mean"] == 0 and g["y@1024"]["change chat+prefix"]["mean"] == 0
    assert g["all"]["change_in_cost"]["n"] == 20 and g["all"]["change_in_cost"]["mean"] == pytest.approx(
        -0.15
    )
    lo, hi = g["x@1024"]["change_in_cost"]["ci_low"], g["x@1024"]["change_in_cost"]["ci_high"]
    assert -0.7 < lo < -0.3 < hi <= 0  # 3 of 10 examples lost: the bootstrap interval reaches 0 at most
    md = compare_markdown(c)
    assert "### sft vs base (1 examples with different prompts not paired)" in md
    assert (
        "| x | 1024 | 0.0 [0.0, 0.0] | -30.0 [" in md
        and "| y | pooled |" not in md
        and "| all | pooled |" in md
    )
    with pytest.raises(CtxawareError):
        compare({"base": a})


def test_two_models_in_one_ruler_command_write_their_comparison(tmp_path, smollm2_tok):
    """`ctxaware ruler --model A,B` runs both on the same prompts and writes comparison.{md,json}; a model
    against its own copy changes nothing (every difference exactly 0)."""
    from ctxaware.cli import main
    from tests.conftest import tiny_llama

    dirs = []
    for name in ("base", "copy"):
        d = tmp_path / name
        tiny_llama().save_pretrained(d)
        smollm2_tok.save_pretrained(d)
        dirs.append(str(d))
    out = tmp_path / "r"
    assert main(["ruler", "--model", ",".join(dirs), "--tasks", "niah_single_1", "--lengths", "256", "--n", "2",
                 "--conditions", "chat+prefix,plain+prefix", "--device", "cpu", "--output", str(out)]) == 0  # fmt: skip
    c = json.loads((out / "comparison.json").read_text())
    (m,) = c["models"]
    g = c["models"][m]["groups"]["all"]
    assert c["models"][m]["unpaired"] == 0 and g["change_in_cost"]["n"] == 2
    assert all(g[k]["mean"] == 0 for k in g)
    assert "change in template cost" in (out / "comparison.md").read_text()
    from ctxaware.reporting.report import write_report

    md = write_report([out], tmp_path / "r.html").with_suffix(".md").read_text()
    assert "RULER-class retrieval, model against model: r" in md and "change in template cost" in md
    assert "Table 4" not in md  # not taken for the experiment's comparison.json


def test_summary_pools_the_tasks_of_each_length_by_hand():
    """``all@length`` pools every task's examples at that length (each example one unit, keyed by task and
    index, so index 0 of two tasks are two examples)."""
    from ctxaware.evaluation.ruler import summary

    rows = []
    for i in range(10):
        rows += [_row("x", i, "chat+prefix", float(i < 2), 0.5), _row("x", i, "plain+prefix", 1, 0.6)]
        rows += [_row("y", i, "chat+prefix", 1, 0.5), _row("y", i, "plain+prefix", 1, 0.6)]
    s = summary(rows)
    assert list(s) == ["x@1024", "y@1024", "all@1024"]
    assert s["x@1024"]["paired"]["chat+prefix - plain+prefix"]["mean"] == pytest.approx(-0.8)
    pooled = s["all@1024"]
    assert pooled["paired"]["chat+prefix - plain+prefix"]["n"] == 20
    assert pooled["paired"]["chat+prefix - plain+prefix"]["mean"] == pytest.approx(-0.4)
    assert pooled["conditions"]["chat+prefix"]["score"]["mean"] == pytest.approx(0.6)
    shift = pooled["paired_raw_user_share"]["chat+prefix - plain+prefix"]  # 0.5 - 0.6 on every example
    assert shift["mean"] == pytest.approx(-0.1) and shift["n"] == 20
    assert "all@1024" not in summary([r for r in rows if r["task"] == "x"])


def test_a_length_past_the_window_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """SmolLM2-135M's window is 8,192 tokens: --lengths 9000 exits 2 with one line, from the tokenizer's
    config alone (no model load), and writes nothing; --dump-prompts refuses it too."""
    from ctxaware.cli import main
    from ctxaware.core import config

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(config.ModelConfig, "load", no_load)
    out = tmp_path / "r"
    for extra in ([], ["--dump-prompts", str(tmp_path / "p.jsonl")]):
        assert main(["ruler", "--tasks", "vt", "--lengths", "1024,9000", "--output", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert (
            err.count("\n") == 0
            and "--lengths 9000: longer than smollm2-135m-instruct's window of 8192" in err
        )
    assert not out.exists() and not (tmp_path / "p.jsonl").exists()


def _lengths_script(name: str = "lengths"):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "ruler" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"ruler_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_dir(root, seed, rows, model="m"):
    d = root / model
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"config": {"seed": seed, "model": model}}))
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root)


def _lrow(task, length, index, condition, score, user, layer="11", size=50):
    att = {layer: {"raw": {"user": user}, "sink_excluded": {"user": user}}}
    return {"task": task, "length": length, "index": index, "condition": condition, "score": score,
            "n_prompt_tokens": 10, "haystack_size": size, "answers": ["1234567"], "attention": att}  # fmt: skip


def test_length_table_pools_runs_by_hand(tmp_path, capsys):
    """docs/ruler/lengths.py: an example is (task, length, seed, index), read once (the first run wins); the
    pair's scores and difference per length, the task's own entry when one task ran at a length, and the raw
    user-share shift at its layer: one row per layer, never pooled across layers."""
    first = [_lrow("a", 1024, i, c, s, u) for i, (c, s, u) in enumerate([("chat+prefix", 1.0, 0.2)] * 2)]
    first += [_lrow("a", 1024, i, "plain+prefix", 0.0, 0.3) for i in range(2)]
    # the same contexts again with other scores (ignored: already read), and one new context (seed 7)
    again = [_lrow("a", 1024, 0, "chat+prefix", 0.0, 0.9), _lrow("a", 1024, 0, "plain+prefix", 1.0, 0.1)]
    other = [_lrow("a", 1024, 0, "chat+prefix", 0.0, 0.5), _lrow("a", 1024, 0, "plain+prefix", 0.0, 0.5)]
    at4k = [
        _lrow("b", 4096, 0, c, s, 0.4, layer="9") for c, s in (("chat+prefix", 1.0), ("plain+prefix", 1.0))
    ]
    dirs = [_run_dir(tmp_path / "r1", 42, first), _run_dir(tmp_path / "r2", 42, again),
            _run_dir(tmp_path / "r3", 7, other), _run_dir(tmp_path / "r4", 42, at4k)]  # fmt: skip
    mod = _lengths_script()
    rows = mod.load(dirs)
    assert len(rows) == 8  # 4 + 0 + 2 + 2
    mod.main(dirs)
    out = capsys.readouterr().out
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in out.splitlines() if ln.startswith("| ")}
    # task a at 1K: chat 1, 1, 0 vs plain 0, 0, 0 over 3 examples -> 67 / 0, +66.7 points
    assert lines["a"].split(" | ")[1].startswith("67 / 0: 66.7 [") and lines["a"].endswith("(n=3) |")
    assert lines["b"].split(" | ")[1:3] == ["-", "100 / 100: 0.0 [n=1 too small for a CI] (n=1)"]
    # the pooled row at 4K is b's own entry (one task there); over all lengths 4 examples: chat 3/4, plain 1/4
    pooled = lines["all"].split(" | ")
    assert pooled[2] == "100 / 100: 0.0 [n=1 too small for a CI] (n=1)"
    assert pooled[3].startswith("75 / 25: 50.0 [") and pooled[3].endswith("(n=4) |")
    # the shift: (0.2 - 0.3) twice and 0 once at layer 11 -> mean -0.067; 0 at layer 9; over all lengths
    # one row per layer, each the same rows as above
    assert lines["1024"].startswith("| 1024 | 11 | -0.067 [")
    assert lines["4096"] == "| 4096 | 9 | 0.000 [n=1 too small for a CI] |"
    every = [ln for ln in out.splitlines() if ln.startswith("| all lengths |")]
    assert every[0].startswith("| all lengths | 9 | 0.000 [n=1 too small") and len(every) == 2
    assert every[1].startswith("| all lengths | 11 | -0.067 [")


def test_length_table_of_the_no_prefix_pair_by_hand(tmp_path, capsys):
    """docs/ruler/lengths.py --no-prefix: the chat and plain rows, the prefix pair's rows ignored."""
    rows = [_lrow("a", 1024, i, "chat", s, 0.2) for i, s in enumerate([1.0, 1.0, 0.0, 1.0])]
    rows += [_lrow("a", 1024, i, "plain", s, 0.5) for i, s in enumerate([0.0, 1.0, 0.0, 0.0])]
    rows += [_lrow("a", 1024, i, c, 1.0, 0.9) for i in range(4) for c in ("chat+prefix", "plain+prefix")]
    mod = _lengths_script()
    mod.main([_run_dir(tmp_path / "r", 42, rows)], mod.NO_PREFIX)
    out = capsys.readouterr().out
    assert out.startswith("chat / plain %: chat - plain in points")
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in out.splitlines() if ln.startswith("| ")}
    # chat 3/4 vs plain 1/4 on the same four contexts: +50 points; the shift 0.2 - 0.5 on every one
    assert lines["a"].split(" | ")[1].startswith("75 / 25: 50.0 [") and lines["a"].endswith("(n=4) |")
    assert lines["1024"].startswith("| 1024 | 11 | -0.300 [")


def test_length_table_leaves_out_rows_without_their_twin(tmp_path, capsys):
    """docs/ruler/lengths.py on a run stopped between a chat row and its plain twin: the lone chat rows are
    left out, so the percent beside the difference is over the same examples (it pooled them before)."""
    rows = [_lrow("a", 4096, i, "chat", s, 0.2) for i, s in enumerate([1.0, 0.0, 1.0, 1.0])]
    rows += [_lrow("a", 4096, i, "plain", 0.0, 0.5) for i in range(2)]  # the twins of 2 and 3 never ran
    mod = _lengths_script()
    d = _run_dir(tmp_path / "r", 42, rows)
    assert {r["index"][2] for r in mod.load([d], mod.NO_PREFIX)} == {0, 1}
    assert "2 without their twin (left out)" in capsys.readouterr().err
    mod.main([d], mod.NO_PREFIX)
    lines = {
        ln.split(" | ")[0].strip("| "): ln
        for ln in capsys.readouterr().out.splitlines()
        if ln.startswith("| ")
    }
    # chat 1, 0 vs plain 0, 0 on contexts 0 and 1: 50 / 0 and +50 points (all four chat rows would say 75)
    assert lines["a"].split(" | ")[1].startswith("50 / 0: 50.0 [") and lines["a"].endswith("(n=2) |")


def test_published_ruler_tables_regenerate(monkeypatch, capsys):
    """Every `python docs/ruler/lengths.py ... docs/ruler/runs/...` command that docs/ruler.md shows, run on the
    rows kept in git (docs/ruler/runs), prints tables whose every line docs/ruler.md holds: the published
    numbers are the committed rows' numbers."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "ruler.md").read_text()
    commands = re.findall(r"^python docs/ruler/lengths\.py (.*docs/ruler/runs/.*)$", doc, flags=re.M)
    assert commands, "docs/ruler.md shows no table made from docs/ruler/runs"
    mod = _lengths_script()
    monkeypatch.chdir(root)
    for command in commands:
        mod.cli(command.split())
        printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
        missing = [ln for ln in printed if ln not in doc.splitlines()]
        assert printed and not missing, f"{command}: docs/ruler.md lacks {missing[:2]}"


def test_load_runs_pairs_only_the_same_context(tmp_path):
    """`ruler.load_runs`: a later run adds the conditions an example lacks (the steering grid beside its
    unsteered run) when its context is the example's first one; a row of another context (the haystack
    sized for other conditions) is counted, never paired; runs of two models are refused."""
    from ctxaware.evaluation.ruler import load_runs, summary

    base = [
        _lrow("a", 1024, i, c, s, 0.2) for i in range(3) for c, s in (("chat+prefix", 0), ("plain+prefix", 1))
    ]
    steered = [_lrow("a", 1024, i, "chat+prefix+steer0.3", 1.0, 0.2) for i in range(3)]
    steered += [_lrow("a", 1024, 0, "chat+prefix", 1.0, 0.2)]  # repeated: the first run's reading stays
    steered += [_lrow("a", 1024, 1, "chat+prefix+steer0.5", 1.0, 0.2, size=60)]  # another context
    dirs = [_run_dir(tmp_path / "r1", 42, base), _run_dir(tmp_path / "r2", 42, steered) + "/m"]
    rows, counts = load_runs(dirs)
    assert counts == {"read": 9, "repeated": 1, "other_context": 1}
    assert {r["index"] for r in rows} == {(1024, 42, 0), (1024, 42, 1), (1024, 42, 2)}
    paired = summary(rows)["a@1024"]["paired"]
    assert paired["chat+prefix+steer0.3 - chat+prefix"]["mean"] == 1.0  # 3 of 3 recovered
    assert paired["plain+prefix - chat+prefix+steer0.3"]["mean"] == 0.0
    # docs/ruler/steering.py: chat 0/3, plain 3/3, steered at 0.3 3/3 -> recovered 100, gap 100 then 0
    [(title, table)] = _lengths_script("steering").tables(rows)
    assert title == "a@1024 (chat+prefix, plain+prefix 100.0 %)"
    assert table[0] == ["none", "0.0", "", "100.0 [n=3 too small for a CI]"]
    assert table[1] == [
        "0.3",
        "100.0",
        "100.0 [n=3 too small for a CI] (n=3)",
        "0.0 [n=3 too small for a CI]",
    ]
    # the unsteered gap is the summary's chat - plain negated: the CI of plain - chat computed directly
    from ctxaware.core.stats import fmt, summarize

    plain = [float(i % 3 != 0) for i in range(12)]
    more = [
        _lrow("c", 2048, i, c, s, 0.2) for i in range(12) for c, s in (("chat", 0.0), ("plain", plain[i]))
    ]
    more += [_lrow("c", 2048, i, "chat+steer1", 0.0, 0.2) for i in range(12)]
    [(_, table)] = _lengths_script("steering").tables(more)
    assert table[0][3] == fmt(summarize(plain)) and "[" in table[0][3] and "too small" not in table[0][3]
    _run_dir(tmp_path / "r3", 42, base, model="other")
    with pytest.raises(CtxawareError, match="more than one model"):
        load_runs([*dirs, str(tmp_path / "r3")])
    with pytest.raises(CtxawareError, match="no rows.jsonl"):
        load_runs([str(tmp_path)])
    (tmp_path / "r3" / "other" / "meta.json").unlink()
    with pytest.raises(CtxawareError, match="without the meta.json"):
        load_runs([str(tmp_path / "r3")])
    # a later run of the pair without the prefix, its contexts sized for it (size 70): another context for
    # every example, unless only its conditions are read
    noprefix = [_lrow("a", 1024, i, c, 1.0, 0.2, size=70) for i in range(3) for c in ("chat", "plain")]
    dirs.append(_run_dir(tmp_path / "r4", 42, noprefix))
    assert load_runs(dirs)[1]["other_context"] == 1 + 6
    rows, counts = load_runs(dirs, conditions=("chat", "plain"))
    assert counts == {"read": 6, "repeated": 0, "other_context": 0}
    assert {r["haystack_size"] for r in rows} == {70}
